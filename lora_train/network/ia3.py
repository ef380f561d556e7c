"""IA3 (LyCORIS `algo=ia3`): one trained scale per output channel of the target (or per input
channel, `train_on_input`), dW = W * w along that axis, so the module holds a single vector.

File keys under the module name, as LyCORIS 4.1.3 writes them and A1111's `network_ia3.py` reads them:
- `weight`: (out,) on a Linear or an attention part, (1, out, 1, 1) on a Conv2d; with
  `train_on_input` the input channels instead: (in,) or (1, in, 1, 1).
- `on_input`: a 0-dim tensor flag, 1 when `weight` scales the input channels. A1111 reads it with
  `.item()` and needs it there, so it is required here too (and on a square Linear it is the only
  thing that tells the two axes apart).
There is no `alpha`: IA3 has no rank, its scale is 1 (A1111: no dim, so `calc_scale()` is 1).

LyCORIS starts `weight` at zero, so a new module changes nothing and draws no random numbers.
LyCORIS' IA3 applies neither `dropout` nor `rank_dropout`, and neither do we; module dropout is the
base's. It has no DoRA: LyCORIS accepts `dora_wd` and ignores it for IA3, and never writes a
`dora_scale` for it, so `enable_dora` refuses rather than train something no IA3 loader expects.

A1111 v1.10 applies a Conv2d file only with `on_input`: without it, its `w.reshape(-1, 1)` lines up
with the conv weight's kernel axes instead of its output channels (a 3x3 conv raises, a 1x1 one
gives an (out, in, out, 1) change it cannot apply). A fault of that loader; the file is LyCORIS'.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_train.network.module import NetworkModule, describe_target
from lora_train.network.targets import is_linear


class IA3(NetworkModule):
    algorithm = "IA3"
    SCALES_WITH = ("weight",)
    algo = "ia3"
    suffixes = ("weight", "on_input")
    optional = ()

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, *, train_on_input: bool = False, **options):
        if options:
            raise TypeError(f"{name}: IA3 has no option {', '.join(sorted(options))}")
        super().__init__(name, org, dim, alpha, part)
        # no rank and no alpha: keep the base's buffer for its bookkeeping, but out of the file,
        # as LyCORIS writes none
        self.register_buffer("alpha", self.alpha, persistent=False)
        self.train_on_input = bool(train_on_input)
        self.weight = nn.Parameter(torch.zeros(self._weight_shape(org, self.target_shape, self.train_on_input)))
        # LyCORIS' flag: an integer tensor, saved with the file
        self.register_buffer("on_input", torch.tensor(int(self.train_on_input)))

    @staticmethod
    def _weight_shape(org: nn.Module, target_shape: torch.Size, on_input: bool) -> tuple[int, ...]:
        channels = target_shape[1] if on_input else target_shape[0]
        if isinstance(org, nn.Conv2d):
            return (1, channels, 1, 1)  # LyCORIS keeps the conv layout, ready to broadcast
        return (channels,)

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        # a grouped conv's weight holds in/groups input channels, which a per-input scale cannot address
        return is_linear(org) or isinstance(org, nn.MultiheadAttention) or (isinstance(org, nn.Conv2d) and org.groups == 1)

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "IA3":
        for key in cls.suffixes:
            if key not in weights:
                raise KeyError(f"{name}.{key}: missing (IA3 needs {' and '.join(cls.suffixes)})")
        flag = weights["on_input"]
        if flag.numel() != 1 or float(flag) not in (0.0, 1.0):
            raise KeyError(f"{name}.on_input: {tuple(flag.shape)} tensor is not a 0/1 flag")
        module = cls(name, org, 1, None, part=part, train_on_input=bool(float(flag)))
        if tuple(weights["weight"].shape) != tuple(module.weight.shape):
            axis = "input" if module.train_on_input else "output"
            raise KeyError(f"{name}.weight: shape {tuple(weights['weight'].shape)} does not fit {describe_target(org, part)} "
                           f"(on_input={int(module.train_on_input)}: one scale per {axis} channel, {tuple(module.weight.shape)})")
        return module

    @property
    def scale(self) -> float:
        return 1.0

    def refresh(self) -> None:
        super().refresh()
        # the flag may have been copied in from a file
        self.train_on_input = bool(self.on_input)

    def enable_dora(self, wd_on_out: bool = True) -> None:
        raise TypeError(f"{self.lora_name}: IA3 has no DoRA (LyCORIS ignores dora_wd for IA3 and no IA3 loader reads a dora_scale)")

    def weight_delta(self) -> torch.Tensor:
        # detached: the target is frozen, and a host weight that requires grad must not collect
        # gradients through the module
        org = self.org_weight().detach().to(self.weight.dtype)
        if self.train_on_input:
            w = self.weight.reshape(1, -1, *[1] * (org.dim() - 2))
        else:
            w = self.weight.reshape(-1, *[1] * (org.dim() - 1))
        return org * w


