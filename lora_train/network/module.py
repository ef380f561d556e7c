"""What every network algorithm's module shares: its kohya name, multiplier, alpha and scale, sd-scripts'
three dropouts, and attaching to its target.

A module never replaces the host module: `attach` registers a forward hook and `detach` removes it,
so module names, weights and the host's own LoRA patching are untouched. A q/k/v/out part of a fused
`nn.MultiheadAttention` joins that attention's own forward instead (`network/fused.py`).

An algorithm (one file each: `lora.py`, `locon.py`, ...) subclasses `NetworkModule` and gives:
- `suffixes` (and `optional`, `claims`): the state-dict keys it owns under the module's name
  (`lora_down.weight`, ...), which is how `network/algorithms.py` tells which algorithm a file's
  module belongs to, and `from_weights` to build a module shaped for a file's weights;
- `accepts(target)`: which target modules it trains;
- `weight_delta()`: the change it makes to the target's WEIGHT at multiplier 1, shaped like that
  weight (for a fused attention part, like that part's [embed_dim, embed_dim] slice), its scale
  (alpha / rank) included;
- `forward_delta(x)` (optional): what it adds to the target's output for input `x`, when the
  algorithm has a cheaper path than the weight (LoRA's low-rank product); by default the module
  applies `delta()` to `x` as the target would apply its weight.

`delta()` is then the change to the weight with the multiplier and DoRA (`dora.py`, LyCORIS'
`dora_wd`) included, so that target(x) with the module == the target with `weight + delta()` for
every input. Fused attention, block weights, merging and resizing build on it for every algorithm.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lora_train.network import dora, fused
from lora_train.network.targets import is_linear


def describe_target(org: nn.Module, part: str | None = None) -> str:
    """The target as a message names it: `a Linear 8->6`, `a Conv2d 8->6 with a 3x3 kernel`, ..."""
    if isinstance(org, nn.MultiheadAttention):
        return f"the {part} part of a MultiheadAttention {org.embed_dim}->{org.embed_dim}"
    if isinstance(org, nn.Conv2d):
        return f"a Conv2d {org.in_channels}->{org.out_channels} with a {'x'.join(map(str, org.kernel_size))} kernel"
    if is_linear(org):
        return f"a Linear {org.in_features}->{org.out_features}"
    return f"a {type(org).__name__}"


def target_weight_shape(org: nn.Module) -> torch.Size:
    """The shape of the weight a module on `org` changes: for a fused attention's q/k/v/out part, its
    [embed_dim, embed_dim] slice (`fused.part_weight`)."""
    if isinstance(org, nn.MultiheadAttention):
        return torch.Size((org.embed_dim, org.embed_dim))
    return org.weight.shape


class NetworkModule(nn.Module):
    algorithm: ClassVar[str] = "?"  # the name users know it by, used in messages
    suffixes: ClassVar[tuple[str, ...]] = ()  # state-dict keys under the module name; `alpha` included
    optional: ClassVar[tuple[str, ...]] = ("alpha",)  # of those, the ones a file may leave out
    algo: ClassVar[str | None] = None  # LyCORIS' `algo=` name; None for sd-scripts' own networks.lora

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, part: str | None = None):
        super().__init__()
        if isinstance(org, nn.MultiheadAttention) and part not in fused.PARTS:
            raise TypeError(f"{name}: a MultiheadAttention target needs its part (q, k, v or out)")
        if not self.accepts(org, part):
            raise TypeError(f"{name}: {self.algorithm} does not train a {type(org).__name__}{self._kernel_text(org)}")
        self.lora_name = name
        self._org = (org,)  # a tuple: the target is not a submodule (its weights are not ours to save)
        self.lora_dim = int(dim)
        self.part = part  # "q" | "k" | "v" | "out" when `org` is a fused MultiheadAttention
        self.target_shape = target_weight_shape(org)
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
        self.dora_scale: nn.Parameter | None = None
        self.wd_on_out = True
        self._handle = None

    # -- what an algorithm defines -------------------------------------------------------------
    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        """Whether a module's file keys (their suffixes) are this algorithm's."""
        return set(cls.suffixes) - set(cls.optional) <= suffixes

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        """Whether this algorithm trains `org` (a q/k/v/out `part` of it, for a fused attention)."""
        raise NotImplementedError

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "NetworkModule":
        """A module shaped for a file's weights of this algorithm (`weights` by suffix); the values
        are copied in afterwards."""
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        """The change to the target's weight (shaped like it) at multiplier 1, scale included, before DoRA."""
        raise NotImplementedError

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the module adds to its target's output for input `x`, or None when module dropout
        skips it this time."""
        if self._skipped():
            return None
        return self.apply_weight(x, self.delta())

    def delta(self) -> torch.Tensor:
        """The change to the target's weight (shaped like it), scale, multiplier and DoRA included."""
        if self.dora_scale is not None:
            return dora.decomposed_delta(self.org_weight(), self.weight_delta(), self.dora_scale, self.multiplier, self.wd_on_out)
        return self.weight_delta() * self.multiplier

    # -- shared --------------------------------------------------------------------------------
    @property
    def org(self) -> nn.Module:
        return self._org[0]

    def org_weight(self) -> torch.Tensor:
        """The target's weight this module changes (a fused attention part's slice)."""
        return fused.part_weight(self.org, self.part) if self.part is not None else self.org.weight

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`x` through `weight` as the target applies its own (stride, padding ...), without bias."""
        weight = weight.to(x.dtype)
        org = self.org
        if isinstance(org, nn.Conv2d):
            return F.conv2d(x, weight, None, org.stride, org.padding, org.dilation, org.groups)
        return F.linear(x, weight)

    def enable_dora(self, wd_on_out: bool = True) -> None:
        """LyCORIS' DoRA (`dora_wd=True`): a trained magnitude `dora_scale`, starting at the norm of
        the target's weight per output row (`wd_on_out`) or per input column."""
        self.wd_on_out = wd_on_out
        self.dora_scale = nn.Parameter(dora.norm(self.org_weight().detach().float(), wd_on_out))

    @property
    def scale(self) -> float:
        return self.alpha_value / self.lora_dim

    # -- scaling the change: block weights (tools/lbw.py) and scale_weight_norms ------------------------
    # The tensors (by their key in a file) the change is linear in together: multiplying each one the
    # module has by r multiplies its change by r. Empty: no such tensors (OFT rotates the weight).
    SCALES_WITH: tuple[str, ...] = ()

    def scale_delta_(self, ratio: torch.Tensor) -> None:
        for key in self.SCALES_WITH:
            try:
                p = self.get_parameter(key)
            except AttributeError:  # LoKr has lokr_w1 or lokr_w1_a, Full diff_b only with a bias
                continue
            p.mul_(ratio.to(p.dtype))

    # scale_weight_norms as LyCORIS' apply_max_norm does it per algorithm
    def max_norm_tensor(self) -> torch.Tensor | None:
        """The tensor whose norm scale_weight_norms caps, or None for the algorithms LyCORIS leaves
        alone (IA3, full, GLoRA, norms, DyLoRA). Read with the module in eval mode: no rank dropout."""
        return None

    def scale_max_norm_(self, ratio: torch.Tensor) -> None:
        """Multiply `max_norm_tensor()` by `ratio` through the trained parameters."""
        self.scale_delta_(ratio)

    def refresh(self) -> None:
        """Re-read Python copies of buffers after their values were copied in."""
        self.alpha_value = float(self.alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()

    def _scalar_loaded(self, prefix: str, missing_keys: list) -> None:
        """LyCORIS' use_scalar: files hold the scalar folded into a factor, so after a load it is 1
        (and its absence from the file is not a missing key)."""
        if getattr(self, "scalar", None) is None:
            return
        if prefix + "scalar" in missing_keys:
            missing_keys.remove(prefix + "scalar")
        with torch.no_grad():
            self.scalar.fill_(1.0)

    def _rand(self, shape, device) -> torch.Tensor:
        return torch.rand(shape, generator=self.dropout_generator).to(device)

    def _skipped(self) -> bool:
        """sd-scripts' module dropout: in training, leave the whole module out this time."""
        return bool(self.training and self.module_dropout and float(self._rand((1,), "cpu")) < self.module_dropout)

    def _hook(self, module, args, output):
        delta = self.forward_delta(args[0])
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

    @staticmethod
    def _kernel_text(org: nn.Module) -> str:
        return f" with a {'x'.join(map(str, org.kernel_size))} kernel" if isinstance(org, nn.Conv2d) else ""


class _FusedHandle:
    def __init__(self, mha: nn.MultiheadAttention, part: str):
        self.mha, self.part = mha, part

    def remove(self) -> None:
        fused.detach(self.mha, self.part)
