"""GLoRA (LyCORIS `algo=glora`, "generalized LoRA"): the target's weight is changed through its own
input side as well as by a low-rank term, dW = W @ A + B with A (in x in) and B (out x in) both low
rank, i.e. f(x) = W(x + Ax) + Bx.

Key layout: A1111 v1.10's, which differs from LyCORIS 4.1.3's. A1111's `network_glora.py` was
written for LyCORIS 2.x, where `a1`/`b1` are the down projections and `a2`/`b2` the up ones:
    dW = W @ a2 @ a1 + b2 @ b1
LyCORIS 3.0 (May 2024) swapped the names -- `a2`/`b2` down, `a1`/`b1` up, dW = W @ a1 @ a2 + b1 @ b2 --
and A1111 v1.10 was not updated, so it cannot apply a LyCORIS 3/4 GLoRA file (the shapes do not
multiply). The math is the same with the names exchanged; we write and read A1111's names, which
ComfyUI also reads (it tells the two layouts apart by their shapes):
- `a1.weight`: (dim, in)      `a2.weight`: (in, dim)
- `b1.weight`: (dim, in)      `b2.weight`: (out, dim)
  on a Conv2d each carries a (1, 1) kernel, except `b1.weight`, which takes the target's kernel
  ((dim, in, kh, kw)), as LyCORIS' b-down conv does; A takes a 1x1 conv on the input channels.
- `alpha`: written, and required by A1111 to recognise the module, but its math ignores it: A1111
  gives GLoRA no dim, so `calc_scale()` is 1. The scale here is 1 as well. LyCORIS and ComfyUI
  scale by alpha / dim, so a new module writes alpha = dim, whatever alpha the network passes, and
  every one of them then applies the same change.
Who applies these files: A1111 v1.10 on a Linear or an attention part (its 4-d matmul cannot apply
conv GLoRA in any layout); ComfyUI on those and on a 1x1 conv (its old-layout branch flattens the
kernel into W's input side, which does not fit a kxk conv). On a kxk conv the file is LyCORIS'
layout under A1111's names, which only LoRA Train reads back.

LyCORIS 4.1.3 starts the up projections (`a2`, `b2` here) kaiming-uniform and the down ones at zero,
so a new module changes nothing. Its `use_tucker` for GLoRA builds nothing (its own condition can
never hold), so there is no `bm.weight` and no Tucker option here. `use_scalar` is LyCORIS': a
trained scalar on the whole change, starting at 0 (the down projections then start random too),
folded into `a1.weight` and `b1.weight` in files and reset to 1 when a state dict is loaded.
LyCORIS applies rank dropout and dropout to GLoRA only in bypass mode; its weight path (ours)
applies none. No DoRA: LyCORIS accepts `dora_wd` for GLoRA and ignores it.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from lora_train.network.module import NetworkModule, describe_target, target_weight_shape
from lora_train.network.targets import is_linear

_KEYS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
_SWAP = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight", "b2.weight": "b1.weight"}


class GLoRA(NetworkModule):
    algorithm = "GLoRA"
    SCALES_WITH = ("a1.weight", "b1.weight")  # W a1 a2 + b1 b2
    algo = "glora"
    suffixes = (*_KEYS, "alpha")
    optional = ("alpha",)

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, *, use_scalar: bool = False, **options):
        if options:
            raise TypeError(f"{name}: GLoRA has no option {', '.join(sorted(options))}")
        # alpha = dim: see the module docstring (A1111 ignores alpha, LyCORIS and ComfyUI divide it by dim)
        super().__init__(name, org, dim, dim, part)
        shapes = _shapes(self.target_shape, dim)
        self.a1, self.a2, self.b1, self.b2 = (_Weight(*shapes[key]) for key in _KEYS)
        self.scalar = nn.Parameter(torch.tensor(0.0)) if use_scalar else None
        if use_scalar:
            self.register_state_dict_post_hook(self._fold_scalar)
        self.reset_parameters(generator)

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        # A mixes the input channels, which a grouped conv's weight does not hold all of
        return is_linear(org) or isinstance(org, nn.MultiheadAttention) or (isinstance(org, nn.Conv2d) and org.groups == 1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if generator is None:
            # never the host's global RNG; a per-name seed keeps modules different and reproducible
            generator = torch.Generator().manual_seed(zlib.crc32(self.lora_name.encode()))
        # LyCORIS: kaiming_uniform(a=sqrt(5)) on the up projections, U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        # in its order (its a1, b1 = our a2, b2); the down ones are zero, or random too under use_scalar
        ups = (self.a2.weight, self.b2.weight)
        downs = (self.a1.weight, self.b1.weight)
        for w in ups + (downs if self.scalar is not None else ()):
            bound = 1.0 / math.sqrt(w[0].numel())
            w.uniform_(-bound, bound, generator=generator)
        if self.scalar is None:
            for w in downs:
                w.zero_()

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "GLoRA":
        for key in _KEYS:
            if key not in weights:
                raise KeyError(f"{name}.{key}: missing (GLoRA needs {', '.join(_KEYS)})")
        shape = {key: tuple(weights[key].shape) for key in _KEYS}
        target = target_weight_shape(org)
        # the rank is a1's first dimension (A1111's layout: a1 is the down projection)
        rank = shape["a1.weight"][0] if shape["a1.weight"] else 0
        wrong = [key for key, want in _shapes(target, rank).items() if shape[key] != want]
        if wrong:
            # LyCORIS 3+ has the same shapes under the other names (its a2 is the down projection)
            theirs = _shapes(target, shape["a2.weight"][0] if shape["a2.weight"] else 0)
            swapped = all(shape[key] == theirs[_SWAP[key]] for key in _KEYS)
            hint = " (LyCORIS 3+ names: a1/b1 up, a2/b2 down, which A1111 v1.10 cannot read either)" if swapped else ""
            raise KeyError(f"{name}.{wrong[0]}: shape {shape[wrong[0]]} does not fit {describe_target(org, part)}{hint}")
        return cls(name, org, rank, None, part=part)

    @property
    def scale(self) -> float:
        return 1.0  # A1111 v1.10's GLoRA math has no scale (see the module docstring)

    def enable_dora(self, wd_on_out: bool = True) -> None:
        raise TypeError(f"{self.lora_name}: GLoRA has no DoRA (LyCORIS ignores dora_wd for GLoRA and writes no dora_scale for it)")

    def weight_delta(self) -> torch.Tensor:
        a1, a2 = self.a1.weight.flatten(1), self.a2.weight.flatten(1)
        b1, b2 = self.b1.weight.flatten(1), self.b2.weight.flatten(1)
        # detached: the target is frozen, and a host weight that requires grad must not collect
        # gradients through the module
        org = self.org_weight().detach().to(a1.dtype)
        # W @ A on the input channels, as (W @ a2) @ a1: out*in*dim work, never an in x in matrix;
        # a conv's kernel axes ride along
        wa = torch.einsum("oi...,ir,rj->oj...", org, a2, a1)
        delta = wa + (b2 @ b1).reshape(self.target_shape)
        return delta if self.scalar is None else delta * self.scalar

    # -- use_scalar: the scalar lives in a1/b1 in files, as LyCORIS writes it -------------------------
    @staticmethod
    def _fold_scalar(module: "GLoRA", state, prefix: str, local_metadata) -> None:
        # a post hook, as a1/b1 are written by their own submodules after our _save_to_state_dict
        if module.scalar is None:
            return
        state.pop(prefix + "scalar", None)
        for key in ("a1.weight", "b1.weight"):
            kept = state[prefix + key].requires_grad  # keep_vars: the caller wants the graph
            folded = getattr(module, key.split(".")[0]).weight * module.scalar
            state[prefix + key] = folded if kept else folded.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._scalar_loaded(prefix, missing_keys)  # the loaded a1/b1 already carry the scalar


class _Weight(nn.Module):
    """A bare `weight` parameter, so the state-dict key is `a1.weight` as in the files; the module
    never runs it as a layer."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


def _shapes(target_shape: torch.Size, dim: int) -> dict[str, tuple[int, ...]]:
    """The file shapes of a rank-`dim` GLoRA on a target weight of `target_shape`."""
    out_dim, in_dim, *kernel = target_shape
    point = (1, 1) if kernel else ()  # on a conv, A and B's up projection are 1x1 convs
    return {"a1.weight": (dim, in_dim, *point), "a2.weight": (in_dim, dim, *point),
            "b1.weight": (dim, in_dim, *kernel), "b2.weight": (out_dim, dim, *point)}


