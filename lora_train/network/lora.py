"""LoRA: a low-rank delta `up @ down` on a Linear, a 1x1 Conv2d or a q/k/v/out part of a fused
attention. kohya keys: `lora_down.weight`, `lora_up.weight`, `alpha`; scale = alpha / rank.

The same module with a spatial `lora_down` kernel is LoCon (`locon.py`), which subclasses this one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import skip_init

from lora_train.network.module import NetworkModule
from lora_train.network.targets import is_linear


def is_spatial_conv(org: nn.Module) -> bool:
    return isinstance(org, nn.Conv2d) and tuple(org.kernel_size) != (1, 1)


class LoRA(NetworkModule):
    algorithm = "LoRA"
    SCALES_WITH = ("lora_up.weight",)
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None):
        super().__init__(name, org, dim, alpha, part)
        # skip_init: torch's own init would draw from the global RNG (the host's); ours comes from `generator`
        if isinstance(org, nn.MultiheadAttention):
            self.lora_down = skip_init(nn.Linear, org.embed_dim, dim, bias=False)
            self.lora_up = skip_init(nn.Linear, dim, org.embed_dim, bias=False)
        elif isinstance(org, nn.Conv2d):
            # the down conv takes the target's kernel, stride and padding (LoCon); up is always 1x1
            self.lora_down = skip_init(nn.Conv2d, org.in_channels, dim, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = skip_init(nn.Conv2d, dim, org.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = skip_init(nn.Linear, org.in_features, dim, bias=False)
            self.lora_up = skip_init(nn.Linear, dim, org.out_features, bias=False)
        self.reset_parameters(generator)

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        return is_linear(org) or isinstance(org, nn.MultiheadAttention) or (isinstance(org, nn.Conv2d) and not is_spatial_conv(org))

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "LoRA":
        alpha = weights.get("alpha")
        return cls(name, org, weights["lora_down.weight"].shape[0], float(alpha) if alpha is not None else None, part=part)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # sd-scripts: down = kaiming_uniform(a=sqrt(5)), up = zeros, so a new LoRA changes nothing.
        # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawn from our own
        # generator so the host's global RNG is never consumed.
        w = self.lora_down.weight
        bound = 1.0 / math.sqrt(w[0].numel())
        w.uniform_(-bound, bound, generator=generator)
        self.lora_up.weight.zero_()

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.dora_scale is not None:  # the decomposition needs the whole weight
            return super().forward_delta(x)
        if self._skipped():
            return None
        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        # The scale goes on the rank-r tensor, not the full-size output: same result, less work.
        scale = self.multiplier * self.scale
        if self.training and self.dropout:
            keep = self._rand(lx.shape, lx.device) >= self.dropout
            lx = lx * keep / (1.0 - self.dropout)
        if self.training and self.rank_dropout:
            # drop whole ranks per sample, and rescale as if the rank were smaller
            mask = self._rand((lx.shape[0], self.lora_dim), lx.device) > self.rank_dropout
            if lx.dim() == 3:  # (batch, tokens, rank)
                mask = mask[:, None, :]
            elif lx.dim() == 4:  # (batch, rank, h, w)
                mask = mask[:, :, None, None]
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(lx if scale == 1.0 else lx * scale)

    def max_norm_tensor(self) -> torch.Tensor | None:
        return self.weight_delta()  # before DoRA: LyCORIS caps the LoCon product under DoRA too

    def scale_max_norm_(self, ratio: torch.Tensor) -> None:
        # sd-scripts shrinks both factors by sqrt(ratio); LyCORIS keeps a scalar, the same change
        for weight in (self.lora_up.weight, self.lora_down.weight):
            weight.mul_(ratio.sqrt().to(weight.dtype))

    def weight_delta(self) -> torch.Tensor:
        # up is (out, rank[, 1, 1]), down (rank, in[, kh, kw]): their product over the rank is the
        # weight change, with the down kernel's spatial shape (1x1 for LoRA, kxk for LoCon)
        up = self.lora_up.weight.flatten(1)
        down = self.lora_down.weight.flatten(1)
        return (up @ down).reshape(self.target_shape) * self.scale


LoRAModule = LoRA  # the name the rest of LoRA Train (and its tests) have used since the start
