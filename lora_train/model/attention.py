"""PyTorch's fused attention (`scaled_dot_product_attention`) in the model's attention layers, for one
training run outside the WebUI, swapped in and taken out again.

ldm's `CrossAttention` (the UNet of SD1/SD2, and of our SDXL build from ldm classes) computes the whole
attention matrix with einsum and softmax and keeps it for the backward: at 512 px that is most of a
step's memory, and what a GPU runs out of at 1024 px. sd-scripts' `--sdpa` runs the same attention
through SDPA; so does this, with the same result to float rounding.

What is swapped, per module, with an instance `forward` (the class, the weights, the module tree and
any hooks stay as they are; taking the instance attribute away again restores the class's forward):
- ldm `CrossAttention` (UNet) and ldm `AttnBlock` (the VAE's single-head mid-block attention);
- Hugging Face `CLIPAttention` (SD1's text encoder, SDXL's first), only when the text encoder trains:
  transformers 4.30 computes it eagerly;
- not sgm's `CrossAttention` / `AttnBlock`: on torch 2 sgm calls SDPA itself (`SDP_IS_AVAILABLE`), and
  below torch 2 there is no SDPA to swap in;
- not OpenCLIP's `nn.MultiheadAttention`: torch's own forward uses SDPA when no weights are asked for
  (OpenCLIP asks for none), and a LoRA on it computes attention in `network/fused.py`, with SDPA too.

A module is swapped only when its class is one of the above exactly and its forward is still the one
its class was defined with: a host that replaced it (the WebUI's cross-attention optimisation, which
assigns `CrossAttention.forward`) or an instance forward already there (a LoRA's fused attention) keeps
its own. The WebUI's adapter says so anyway (`ModelAdapter.host_attention`): there no swap is tried.

Only arguments torch 2.1 has are used (the WebUI's torch): no `scale`, no `enable_gqa`.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _ldm_cross_attention(self, x, context=None, mask=None):
    """ldm.modules.attention.CrossAttention.forward through SDPA (scale dim_head ** -0.5, SDPA's own)."""
    h = self.heads
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, inner = q.shape
    q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
    attn_mask = None
    if mask is not None:  # ldm: True keeps a key; one row per sample, for every head and query
        attn_mask = mask.reshape(b, 1, 1, -1).to(torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


def _ldm_attn_block(self, x):
    """ldm.modules.diffusionmodules.model.AttnBlock.forward (one head over the channels) through SDPA."""
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


def _hf_clip_attention(self, hidden_states, attention_mask=None, causal_attention_mask=None, output_attentions=False):
    """transformers' CLIPAttention.forward (4.30, eager) through SDPA; the weights it can return are
    only computed the eager way."""
    if output_attentions:
        return type(self).forward(self, hidden_states, attention_mask, causal_attention_mask, output_attentions)
    bsz, length, embed = hidden_states.shape
    q, k, v = (proj(hidden_states).reshape(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    mask = None  # both masks are additive, (bsz, 1, length, length)
    for m in (causal_attention_mask, attention_mask):
        if m is not None:
            mask = m if mask is None else mask + m
    if mask is not None:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(bsz, length, embed)), None


# (module, class name) -> (the SDPA forward, a text-encoder layer)
SWAPS: dict[tuple[str, str], tuple[Callable, bool]] = {
    ("ldm.modules.attention", "CrossAttention"): (_ldm_cross_attention, False),
    ("ldm.modules.diffusionmodules.model", "AttnBlock"): (_ldm_attn_block, False),
    ("transformers.models.clip.modeling_clip", "CLIPAttention"): (_hf_clip_attention, True),
}


def replacement(module: nn.Module, text_encoder: bool = True) -> Callable | None:
    """The SDPA forward for `module`, or None when it keeps its own (see the module docstring)."""
    cls = type(module)
    found = SWAPS.get((cls.__module__, cls.__qualname__))
    if found is None or (found[1] and not text_encoder) or "forward" in module.__dict__:
        return None
    if getattr(cls.forward, "__module__", None) != cls.__module__:  # a host replaced the class's forward
        return None
    return found[0]


@contextlib.contextmanager
def sdpa_attention(roots: Iterable[nn.Module], text_encoder: bool = True) -> Iterator[list[nn.Module]]:
    """SDPA in every attention layer under `roots` it applies to (the text encoder's only with
    `text_encoder`), for the duration; yields the swapped modules. On every exit each one's forward
    is its class's again."""
    swapped: list[nn.Module] = []
    seen: set[int] = set()
    try:
        for root in roots:
            for m in root.modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                fn = replacement(m, text_encoder)
                if fn is not None:
                    m.forward = types.MethodType(fn, m)
                    swapped.append(m)
        yield swapped
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
