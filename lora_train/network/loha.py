"""LoHa (LyCORIS `algo=loha`): the weight change is the Hadamard (element-wise) product of two
low-rank products, dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / dim, so a rank-r pair reaches a
change of rank up to r^2 for the parameters of a rank-2r LoRA.

File keys under the module name, as LyCORIS 4.1.3 writes them and A1111's `network_hada.py` reads them:
- `hada_w1_a`, `hada_w2_a`: (out, dim)      `hada_w1_b`, `hada_w2_b`: (dim, in * kh * kw)
- with Tucker (`use_tucker`, only on a conv whose kernel is larger than 1x1; LyCORIS silently
  ignores the option elsewhere, and so do we): `hada_t1`, `hada_t2`: (dim, dim, kh, kw), and then
  `hada_w1_a`/`hada_w2_a` are (dim, out) -- transposed against the plain layout -- and
  `hada_w1_b`/`hada_w2_b` are (dim, in): each half is t x_0 w_a x_1 w_b, one (out, in, kh, kw) tensor.
- `alpha`: a scalar; the scale is alpha / dim (no alpha or 0: dim, i.e. scale 1).

`use_scalar` is LyCORIS' trained scalar on the whole change: a parameter `scalar` starting at 0 (and
`hada_w2_a` then starts random instead of at zero, so the gradient can reach the scalar). It is
never written to a file: the saved `hada_w1_a` is `hada_w1_a * scalar`, and loading a state dict
resets the scalar to 1, as LyCORIS does, so files stay readable by every LoHa loader.

Rank dropout is LyCORIS': in training, whole OUTPUT ROWS of dW are dropped (one mask per step, not
per sample: dW is one weight), optionally rescaled by the kept fraction (`rank_dropout_scale`).
LyCORIS' plain `dropout` is not applied by LoHa when the weight is rebuilt (it warns so), and it is
not applied here either.

Where LyCORIS 4.1.3 disagrees with itself we follow what its forward, A1111 and ComfyUI do: its
`get_diff_weight` / `get_merged_weight` multiply the already-scaled weight by alpha/dim a second
time, its forward (and every loader) applies it once.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from lora_train.network.lora import is_spatial_conv
from lora_train.network.targets import is_linear
from lora_train.network.module import NetworkModule, describe_target

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_TUCKER = ("hada_t1", "hada_t2")


class LoHa(NetworkModule):
    algorithm = "LoHa"
    SCALES_WITH = ("hada_w1_a",)
    algo = "loha"
    suffixes = (*_FACTORS, *_TUCKER, "alpha")
    optional = (*_TUCKER, "alpha")

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, *, use_tucker: bool = False, use_scalar: bool = False,
                 rank_dropout_scale: bool = False, **options):
        if options:
            raise TypeError(f"{name}: LoHa has no option {', '.join(sorted(options))}")
        super().__init__(name, org, dim, alpha, part)
        out_dim, in_dim, *kernel = self.target_shape
        self.tucker = bool(use_tucker) and is_spatial_conv(org)
        self.rank_dropout_scale = bool(rank_dropout_scale)
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(dim, dim, *kernel))
            self.hada_w1_a = nn.Parameter(torch.empty(dim, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(dim, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(dim, dim, *kernel))
            self.hada_w2_a = nn.Parameter(torch.empty(dim, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(dim, in_dim))
        else:
            # a conv's kernel is folded into the input side, as in LyCORIS
            flat_in = in_dim * math.prod(kernel)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, dim))
            self.hada_w1_b = nn.Parameter(torch.empty(dim, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, dim))
            self.hada_w2_b = nn.Parameter(torch.empty(dim, flat_in))
        self.scalar = nn.Parameter(torch.tensor(0.0)) if use_scalar else None
        self.reset_parameters(generator)

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        return is_linear(org) or isinstance(org, (nn.Conv2d, nn.MultiheadAttention))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # LyCORIS' init: t ~ N(0, 0.1), w_b ~ N(0, 1), w1_a ~ N(0, 0.1), and w2_a = 0 so the product
        # starts at zero; with use_scalar the zero is the scalar and w2_a is N(0, 0.1) too.
        if generator is None:
            # never the host's global RNG; a per-name seed keeps modules different and reproducible
            generator = torch.Generator().manual_seed(zlib.crc32(self.lora_name.encode()))
        if self.tucker:
            self.hada_t1.normal_(0.0, 0.1, generator=generator)
            self.hada_t2.normal_(0.0, 0.1, generator=generator)
        self.hada_w1_b.normal_(0.0, 1.0, generator=generator)
        self.hada_w1_a.normal_(0.0, 0.1, generator=generator)
        self.hada_w2_b.normal_(0.0, 1.0, generator=generator)
        if self.scalar is not None:
            self.hada_w2_a.normal_(0.0, 0.1, generator=generator)
            self.scalar.zero_()
        else:
            self.hada_w2_a.zero_()

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "LoHa":
        for key in _FACTORS:
            if key not in weights:
                raise KeyError(f"{name}.{key}: missing (LoHa needs {', '.join(_FACTORS)})")
        tucker = [key for key in _TUCKER if key in weights]
        if tucker and not is_spatial_conv(org):
            raise KeyError(f"{name}.{tucker[0]}: Tucker factors need a conv with a kernel larger than 1x1, not {describe_target(org, part)}")
        if len(tucker) == 1:
            missing = next(key for key in _TUCKER if key not in tucker)
            raise KeyError(f"{name}.{missing}: missing ({tucker[0]} is there, and Tucker LoHa needs both)")
        if weights["hada_w1_b"].dim() != 2:
            raise KeyError(f"{name}.hada_w1_b: shape {tuple(weights['hada_w1_b'].shape)} does not fit {describe_target(org, part)}")
        alpha = weights.get("alpha")
        # the rank is w1_b's first dimension in either layout (LyCORIS and A1111 read it there)
        module = cls(name, org, weights["hada_w1_b"].shape[0], float(alpha) if alpha is not None else None, part=part,
                     use_tucker=bool(tucker))
        own = module.state_dict()
        for key, value in weights.items():
            if key in own and key != "alpha" and tuple(value.shape) != tuple(own[key].shape):
                raise KeyError(f"{name}.{key}: shape {tuple(value.shape)} does not fit {describe_target(org, part)}")
        return module

    def weight_delta(self) -> torch.Tensor:
        delta = self._half(self.hada_w1_a, self.hada_w1_b, "hada_t1") * self._half(self.hada_w2_a, self.hada_w2_b, "hada_t2")
        delta = delta.reshape(self.target_shape) * self.scale
        if self.training and self.rank_dropout:
            # LyCORIS drops whole output rows of dW ("rank" dropout redefined for non-LoRA algorithms)
            keep = (self._rand((delta.shape[0],), delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale and bool(keep.any()):  # LyCORIS would divide by 0 when all rows drop
                keep = keep / keep.mean()
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        if self.scalar is not None:
            delta = delta * self.scalar
        return delta

    def max_norm_tensor(self) -> torch.Tensor | None:
        return self.weight_delta()

    def _half(self, w_a: torch.Tensor, w_b: torch.Tensor, core: str) -> torch.Tensor:
        if self.tucker:
            # the core's two rank modes taken to out (by w_a) and in (by w_b): (out, in, kh, kw)
            return torch.einsum("ijhw,jr,ip->prhw", getattr(self, core), w_b, w_a)
        return w_a @ w_b

    # -- use_scalar: the scalar lives in hada_w1_a in files, as LyCORIS writes it -------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.scalar is not None:
            del destination[prefix + "scalar"]
            w1_a = self.hada_w1_a * self.scalar
            destination[prefix + "hada_w1_a"] = w1_a if keep_vars else w1_a.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._scalar_loaded(prefix, missing_keys)  # the loaded hada_w1_a already carries the scalar (see _save_to_state_dict)


