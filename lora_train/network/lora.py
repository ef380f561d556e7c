"""One LoRA / LoCon module: a low-rank delta added to the output of a Linear or Conv2d.

It never replaces the host module: `attach` registers a forward hook and `detach` removes it, so
module names, weights and the host's own LoRA patching are untouched. A q/k/v/out part of a fused
`nn.MultiheadAttention` joins that attention's own forward instead (`network/fused.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_train.network import fused


class LoRAModule(nn.Module):
    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None):
        super().__init__()
        self.lora_name = name
        self.lora_dim = int(dim)
        self.part = part  # "q" | "k" | "v" | "out" when `org` is a fused MultiheadAttention
        if isinstance(org, nn.MultiheadAttention):
            if part not in fused.PARTS:
                raise TypeError(f"{name}: a MultiheadAttention target needs its part (q, k, v or out)")
            self.lora_down = nn.Linear(org.embed_dim, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.embed_dim, bias=False)
        elif isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(org.in_channels, dim, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, org.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org, nn.Linear):
            self.lora_down = nn.Linear(org.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        else:
            raise TypeError(f"{name}: LoRA needs a Linear or Conv2d, not {type(org).__name__}")
        if alpha is None or alpha == 0:
            alpha = dim  # sd-scripts: no alpha means scale 1
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.alpha_value = float(alpha)  # a Python copy: reading the buffer each step would sync a GPU
        self.multiplier = 1.0
        # sd-scripts' dropouts, active only in training mode; masks come from `dropout_generator`
        # (set by the network) so the host's global RNG is never consumed
        self.dropout: float | None = None
        self.rank_dropout: float | None = None
        self.module_dropout: float | None = None
        self.dropout_generator: torch.Generator | None = None
        self.reset_parameters(generator)
        self._handle = None

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # sd-scripts: down = kaiming_uniform(a=sqrt(5)), up = zeros, so a new LoRA changes nothing.
        # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); drawn from our own
        # generator so the host's global RNG is never consumed.
        w = self.lora_down.weight
        bound = 1.0 / math.sqrt(w[0].numel())
        w.uniform_(-bound, bound, generator=generator)
        self.lora_up.weight.zero_()

    @property
    def scale(self) -> float:
        return self.alpha_value / self.lora_dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.alpha_value = float(self.alpha)

    def _rand(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.dropout_generator).to(device)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA's contribution to the output, or None when module dropout skips it this time."""
        if self.training and self.module_dropout and float(self._rand((1,), "cpu")) < self.module_dropout:
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

    def _hook(self, module, args, output):
        delta = self.delta(args[0])
        return output if delta is None else output + delta.to(output.dtype)

    def attach(self, org: nn.Module) -> None:
        if self._handle is not None:
            raise RuntimeError(f"{self.lora_name} is already attached")
        if self.part is not None:
            fused.attach(org, self.part, self)
            self._handle = _FusedHandle(org, self.part)
        else:
            self._handle = org.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None


class _FusedHandle:
    def __init__(self, mha: nn.MultiheadAttention, part: str):
        self.mha, self.part = mha, part

    def remove(self) -> None:
        fused.detach(self.mha, self.part)
