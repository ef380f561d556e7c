"""Norm-layer training (LyCORIS `train_norm=True`): a change to the affine weight and bias of a
LayerNorm or GroupNorm, trained beside whatever algorithm trains the Linear/Conv2d layers.

File keys under the module name, as LyCORIS 4.1.3's `NormModule` writes them and A1111 v1.10's
`network_norm.py` reads them:
- `w_norm`: the change to the norm's weight, shaped like it, (C,);
- `b_norm`: the change to its bias, (C,).
No `alpha`: the scale is 1 (A1111: no dim, so `calc_scale()` is 1), and the multiplier applies to
both, as LyCORIS' forward and A1111's `finalize_updown` (`ex_bias * multiplier`) apply it.

LyCORIS writes `b_norm` for every LayerNorm/GroupNorm (it tests `hasattr(org, "bias")`, true even
when the bias is None), so ours always has it too. A1111 builds a norm module only when BOTH keys
are there; LyCORIS' own loader needs only `w_norm`, so a file without `b_norm` loads here with a
zero bias change.

A norm's output is normalised(x) * weight + bias, linear in (weight, bias), so the change the module
makes is exactly the norm of x with (w_norm, b_norm) as its affine parameters: `forward_delta`
computes that, one normalisation, no weight merged and subtracted.

Both start at zero (LyCORIS zeroes both), so a new module changes nothing and draws no random numbers.
No DoRA: LyCORIS passes `dora_wd` to its NormModule, which ignores it, and no loader reads a
`dora_scale` for a norm, so `enable_dora` refuses.

Rank dropout: LyCORIS drops norm channels in training (the same mask on weight and bias, not
rescaled), but its mask is `rand < rank_dropout`, which KEEPS a fraction `rank_dropout` of them
(every other LyCORIS module keeps `rand > rank_dropout`). We drop a fraction `rank_dropout`, as
the option means everywhere else.

Which norm layers LyCORIS trains (`norm_targets`): with `train_norm`, its kohya wrapper builds a
NormModule for every module whose class name contains "Norm" INSIDE the blocks the preset targets
(before its Linear/Conv checks, so a preset without convs still trains the ResBlocks' norms).
For SD1/SD2/SDXL that is the UNet's SpatialTransformer (`norm`, `transformer_blocks.N.norm1/2/3`)
and ResBlock (`in_layers.0`, `out_layers.0`, kohya's `norm1`/`norm2`) norms. The text encoders'
target blocks (CLIPAttention, CLIPMLP) hold no norm, so no preset trains a text-encoder norm
(`layer_norm1/2`, `final_layer_norm` sit outside them), nor the UNet's `out.0` (conv_norm_out).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_train.network.module import NetworkModule
from lora_train.network.naming import PREFIX_UNET, kohya_name, ldm_unet_path_to_diffusers
from lora_train.network.targets import UNET_BLOCKS, UNET_CONV_BLOCKS, Target, collect


class Norm(NetworkModule):
    algorithm = "Norm"
    SCALES_WITH = ("w_norm", "b_norm")
    algo = "norm"  # LyCORIS' NormModule.name; not an `algo=` value: LyCORIS turns it on with train_norm
    suffixes = ("w_norm", "b_norm")
    optional = ("b_norm",)

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, **options):
        if options:
            raise TypeError(f"{name}: Norm has no option {', '.join(sorted(options))}")
        super().__init__(name, org, dim, alpha, part)
        # dim and alpha mean nothing here; keep the base's buffer but out of the file, as LyCORIS writes none
        self.register_buffer("alpha", self.alpha, persistent=False)
        self.w_norm = nn.Parameter(torch.zeros(self.target_shape))
        self.b_norm = nn.Parameter(torch.zeros(self.target_shape))

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        # affine norms only (there is no weight to change otherwise, and LyCORIS' NormModule fails on
        # one); a LayerNorm over one axis, as LyCORIS shapes w_norm by normalized_shape[0]
        if part is not None or getattr(org, "weight", None) is None:
            return False
        return isinstance(org, nn.GroupNorm) or (isinstance(org, nn.LayerNorm) and len(org.normalized_shape) == 1)

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "Norm":
        if "w_norm" not in weights:
            raise KeyError(f"{name}.w_norm: missing (Norm needs w_norm)")
        module = cls(name, org, 1, None, part=part)
        for key in cls.suffixes:
            if key in weights and tuple(weights[key].shape) != tuple(module.target_shape):
                raise KeyError(f"{name}.{key}: shape {tuple(weights[key].shape)} does not fit {_describe(org)} "
                               f"(its {'weight' if key == 'w_norm' else 'bias'} is {tuple(module.target_shape)})")
        return module

    @property
    def scale(self) -> float:
        return 1.0

    def enable_dora(self, wd_on_out: bool = True) -> None:
        raise TypeError(f"{self.lora_name}: Norm has no DoRA (LyCORIS' norm module ignores dora_wd and no loader reads a norm's dora_scale)")

    def weight_delta(self) -> torch.Tensor:
        return self.w_norm

    def bias_delta(self) -> torch.Tensor:
        """The change to the norm's bias, multiplier included (as `delta()` has it)."""
        return self.b_norm * self.multiplier

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._skipped():
            return None
        weight, bias = self.delta(), self.bias_delta()
        if self.training and self.rank_dropout:
            keep = (self._rand(weight.shape, weight.device) > self.rank_dropout).to(weight.dtype)
            weight, bias = weight * keep, bias * keep
        # normalise in the wider of the two dtypes: a half-precision x with float32 deltas is what
        # ldm's GroupNorm32 and autocast normalise in float32
        dtype = torch.promote_types(x.dtype, weight.dtype)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        org = self.org
        if isinstance(org, nn.GroupNorm):
            return F.group_norm(x, org.num_groups, weight, bias, org.eps)
        return F.layer_norm(x, org.normalized_shape, weight, bias, org.eps)


def _describe(org: nn.Module) -> str:
    """The target as a message names it: `a LayerNorm of 8 channels`, `a GroupNorm of 8 channels in 2 groups`."""
    if isinstance(org, nn.GroupNorm):
        return f"a GroupNorm of {org.num_channels} channels in {org.num_groups} groups"
    if isinstance(org, nn.LayerNorm):
        return f"a LayerNorm of {'x'.join(map(str, org.normalized_shape))} channels"
    return f"a {type(org).__name__}"


# -- which norm layers train_norm adds ---------------------------------------------------------------
def norm_targets(root: nn.Module, blocks: tuple[str, ...], name_of: Callable[[str, str, str], str]) -> list[Target]:
    """The affine LayerNorm/GroupNorm layers inside `root`'s blocks of the classes `blocks`, named as
    `targets.py` names Linear/Conv2d targets. `Target.block` is the block's class, so
    `targets.preset_targets` keeps the norms of the blocks a preset trains, as LyCORIS does (its
    attn-only and ia3 presets reach no norm)."""
    return collect(root, blocks, name_of, Norm.accepts)


def ldm_unet_norm_targets(unet: nn.Module) -> list[Target]:
    """The norms train_norm adds in an ldm `UNetModel` (SD1/SD2), under sd-scripts' diffusers-style
    names (`lora_unet_down_blocks_0_resnets_0_norm1`, `lora_unet_mid_block_attentions_0_norm`, ...)."""
    return norm_targets(unet, UNET_BLOCKS + UNET_CONV_BLOCKS,
                        lambda block_path, cls, child: kohya_name(PREFIX_UNET, ldm_unet_path_to_diffusers(block_path, cls, child)))


def sdxl_unet_norm_targets(unet: nn.Module) -> list[Target]:
    """The norms train_norm adds in an SDXL `UNetModel`, under its own LDM paths, as sd-scripts names them."""
    return norm_targets(unet, UNET_BLOCKS + UNET_CONV_BLOCKS, lambda block_path, cls, child: kohya_name(PREFIX_UNET, f"{block_path}.{child}"))
