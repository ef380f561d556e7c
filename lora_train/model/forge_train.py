"""What Forge's own modules need before autograd can run through them (duck-typed: nothing here imports
Forge; see the Forge notes of issue 24).

- Forge builds and loads its models under `torch.inference_mode()`, so every weight is an inference
  tensor, which a backward pass cannot save ("Inference tensors cannot be saved for backward") and
  whose `.data` cannot be swapped. `own_weights` replaces each such Parameter object by a clone made
  outside inference mode: the same values, bit for bit, one tensor at a time. Forge keeps working on
  the clones (it runs under inference mode, where normal tensors are fine), so they stay.
- Forge's `BasicTransformerBlock._forward` adds its residuals in place (`x += n`), which breaks the
  backward pass of anything trained before it. `out_of_place_blocks` binds, per instance, a forward
  doing the same sums out of place whenever autograd records; otherwise (Forge's own sampling, under
  inference mode) the stock forward runs with every patch Forge's extensions may add.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterable

import torch
from torch import nn

TRANSFORMER_BLOCK = "BasicTransformerBlock"


def inference_weights(roots: Iterable[nn.Module]) -> int:
    """How many parameters and buffers of `roots` are inference tensors."""
    return sum(1 for root in roots for t in [*root.parameters(), *root.buffers()] if t.is_inference())


def float32_embeddings(text_encoders: nn.Module) -> int:
    """Forge's text encoders' token and position embeddings in float32, as Forge's own text engine
    leaves them at every encode (backend/text_processing/classic_engine.py:128-129,
    `encode_with_transformers`); returns how many embeddings changed dtype. They load in the
    checkpoint's dtype (fp16 for the text encoders, also on the CPU), so before Forge's first
    generation the captions would pass the whole text encoder in fp16: slow on a CPU (a run measured
    6x slower by hand) and not the numbers Forge's generations use. fp16 -> fp32 is exact. Runs
    in inference mode, as Forge's does (the weights are inference tensors); own_weights comes after."""
    changed = 0
    with torch.inference_mode():
        for child in text_encoders.children():  # clip_l, clip_g, clip_h (t5xxl has no text_model)
            embeddings = getattr(getattr(getattr(child, "transformer", None), "text_model", None), "embeddings", None)
            if embeddings is None:
                continue
            for name in ("position_embedding", "token_embedding"):
                module = getattr(embeddings, name, None)
                if module is None:
                    continue
                if any(p.dtype != torch.float32 for p in module.parameters()):
                    changed += 1
                setattr(embeddings, name, module.to(dtype=torch.float32))  # what Forge's engine does
    return changed


def own_weights(roots: Iterable[nn.Module]) -> int:
    """Replace every inference-tensor parameter and buffer of `roots` by a normal clone with equal
    values (requires_grad off); returns how many were replaced. Run outside inference mode."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("own_weights must run outside torch.inference_mode()")
    clones: dict[int, torch.Tensor] = {}  # one clone per tensor: weights shared by modules stay shared
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for store, make in ((module._parameters, lambda t: nn.Parameter(t.detach().clone(), requires_grad=False)),
                                (module._buffers, lambda t: t.clone())):
                for name, t in list(store.items()):
                    if t is not None and t.is_inference():
                        if id(t) not in clones:
                            clones[id(t)] = make(t)
                        store[name] = clones[id(t)]
    return len(clones)


def _out_of_place_forward(self, x, context=None, transformer_options={}):  # noqa: B006 (Forge's signature)
    """Forge's BasicTransformerBlock._forward without its in-place sums and its extension patches."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return type(self)._forward(self, x, context, transformer_options)
    options = {"n_heads": self.n_heads, "dim_head": self.d_head}
    if self.ff_in:
        skip = x
        x = self.ff_in(self.norm_in(x))
        if self.is_res:
            x = x + skip
    x = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None, value=None,
                       transformer_options=options)
    if self.attn2 is not None:
        x = x + self.attn2(self.norm2(x), context=context, value=None, transformer_options=options)
    out = self.ff(self.norm3(x))
    return out + x if self.is_res else out


@contextlib.contextmanager
def out_of_place_blocks(unet: nn.Module):
    """Bind the out-of-place forward to every transformer block of `unet` for the context's duration."""
    patched = []
    try:
        for module in unet.modules():
            if type(module).__name__ == TRANSFORMER_BLOCK and hasattr(type(module), "_forward") and "_forward" not in module.__dict__:
                module._forward = types.MethodType(_out_of_place_forward, module)
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("_forward", None)
