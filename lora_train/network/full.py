"""Full fine-tuning as a network (LyCORIS `algo=full`, "native fine-tuning"): the module trains the
whole change to the target's weight, and to its bias, with no factorisation.

File keys under the module name, as LyCORIS 4.1.3 writes them and A1111's `network_full.py` reads them:
- `diff`: the change to the weight, shaped like it ((out, in), (out, in, kh, kw); an attention
  part's [embed, embed] slice);
- `diff_b`: the change to the bias, shaped like it, written when the target has a bias (for an
  attention part: its slice of `in_proj_bias`, or `out_proj.bias`).
No `alpha`: the rank and alpha a network passes are irrelevant and the scale is 1 (A1111: no dim,
so `calc_scale()` is 1). Both start at zero, so a new module changes nothing and draws no random
numbers.

The bias change is not part of `delta()` (a weight): `bias_delta()` gives it, multiplier included
as `delta()` has it, and `forward_delta` adds it to the output, as LyCORIS' forward and A1111's
`ex_bias` do.

Rank dropout is LyCORIS': in training, whole output units are dropped, the same mask on the weight's
rows and on the bias, without rescaling (LyCORIS' default). LyCORIS applies no plain `dropout` to
full, and no DoRA (it has no `dora_wd` for full), so `enable_dora` refuses.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_train.network.module import NetworkModule, describe_target
from lora_train.network.targets import is_linear


def target_bias(org: nn.Module, part: str | None) -> torch.Tensor | None:
    """The bias the module changes: a fused attention part's slice of it, or the target's own."""
    if isinstance(org, nn.MultiheadAttention):
        if part == "out":
            return org.out_proj.bias
        return None if org.in_proj_bias is None else org.in_proj_bias.chunk(3)["qkv".index(part)]
    return org.bias


class Full(NetworkModule):
    algorithm = "Full"
    SCALES_WITH = ("diff", "diff_b")
    algo = "full"
    suffixes = ("diff", "diff_b")
    optional = ("diff_b",)

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, **options):
        if options:
            raise TypeError(f"{name}: Full has no option {', '.join(sorted(options))}")
        super().__init__(name, org, dim, alpha, part)
        # dim and alpha mean nothing here; keep the base's buffer but out of the file, as LyCORIS writes none
        self.register_buffer("alpha", self.alpha, persistent=False)
        self.diff = nn.Parameter(torch.zeros(self.target_shape))
        bias = target_bias(org, part)
        self.diff_b = nn.Parameter(torch.zeros(bias.shape)) if bias is not None else None

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        return is_linear(org) or isinstance(org, (nn.Conv2d, nn.MultiheadAttention))

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "Full":
        if "diff" not in weights:
            raise KeyError(f"{name}.diff: missing (Full needs diff)")
        module = cls(name, org, 1, None, part=part)
        if tuple(weights["diff"].shape) != tuple(module.diff.shape):
            raise KeyError(f"{name}.diff: shape {tuple(weights['diff'].shape)} does not fit {describe_target(org, part)} "
                           f"(its weight is {tuple(module.diff.shape)})")
        if "diff_b" in weights:
            if module.diff_b is None:
                raise KeyError(f"{name}.diff_b: {describe_target(org, part)} here has no bias to change")
            if tuple(weights["diff_b"].shape) != tuple(module.diff_b.shape):
                raise KeyError(f"{name}.diff_b: shape {tuple(weights['diff_b'].shape)} does not fit {describe_target(org, part)} "
                               f"(its bias is {tuple(module.diff_b.shape)})")
        return module

    @property
    def scale(self) -> float:
        return 1.0

    def enable_dora(self, wd_on_out: bool = True) -> None:
        raise TypeError(f"{self.lora_name}: Full has no DoRA (LyCORIS has no dora_wd for algo=full, and the whole weight is trained anyway)")

    def weight_delta(self) -> torch.Tensor:
        return self.diff

    def bias_delta(self) -> torch.Tensor | None:
        """The change to the target's bias, multiplier included (as `delta()` has it); None without a bias."""
        return None if self.diff_b is None else self.diff_b * self.multiplier

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self._skipped():
            return None
        weight, bias = self.delta(), self.bias_delta()
        if self.training and self.rank_dropout:
            keep = (self._rand((weight.shape[0],), weight.device) > self.rank_dropout).to(weight.dtype)
            weight = weight * keep.view(-1, *[1] * (weight.dim() - 1))
            bias = None if bias is None else bias * keep
        out = self.apply_weight(x, weight)
        if bias is not None:
            # the bias runs along the channel axis: last for a Linear, 1 for a conv's (N, C, H, W)
            bias = bias.to(out.dtype)
            out = out + (bias.view(-1, 1, 1) if isinstance(self.org, nn.Conv2d) else bias)
        return out



