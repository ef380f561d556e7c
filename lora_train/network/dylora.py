"""DyLoRA: a LoRA trained so that every prefix of its ranks, in steps of `unit`, is a usable LoRA
(sd-scripts' `networks.dylora` with network_args `unit=N`; LyCORIS' `algo=dylora`, whose kohya
wrapper calls it `block_size`, default 4 there and 1 in sd-scripts).

The file is a plain LoRA: `lora_down.weight` (dim, in[, kh, kw]), `lora_up.weight` (out, dim[, 1, 1])
and `alpha`, loaded everywhere as LoRA/LoCon with scale alpha / dim. So a DyLoRA never claims a
file's module (`claims` is False): only training differs.

Training (module in `train()` mode), every forward: one block b of `unit` ranks is drawn uniformly
(from the network's dropout generator, never Python's or torch's global RNG), and the module acts
as the LoRA truncated to its first r = (b + 1) * unit ranks: the blocks below b are detached (in
the output, not trained), block b is trained, the blocks above are left out. Each block is its own
Parameter, so the blocks not in play get no gradient at all (grad None) and an optimizer leaves them
alone (no momentum, no weight decay), as LyCORIS' per-block ParameterList does. The file's
`lora_down.weight` / `lora_up.weight` are the blocks concatenated (`_save_to_state_dict`) and are
split again on load. In `eval()` mode (sampling, merging) all ranks are used at alpha / dim: the
module is then exactly the LoRA in the file.

The two references disagree (LyCORIS 4.1.3 `modules/dylora.py`, sd-scripts `networks/dylora.py`):
- sd-scripts never truncates: every forward uses all ranks, the drawn block only decides which
  ranks have requires_grad (the others, above and below, are frozen but still in the output), and
  the output is scaled by alpha / dim * sqrt(dim / r). LyCORIS truncates as above, at alpha / (b + 1),
  i.e. alpha over the number of BLOCKS in play.
- Both draw a block on every forward, in eval too (random samples while training), with Python's
  global `random` (uniform over the blocks in both).
We follow LyCORIS' truncation (the DyLoRA paper's: what is trained at rank r is the rank-r LoRA one
cuts from the file) with the paper's scale alpha / r, which is what that cut file is loaded with
(alpha kept, rank r: sd-scripts' extract_lora_from_dylora.py) and, at r = dim, what the whole file
is loaded with. With unit 1 that is exactly LyCORIS' alpha / (b + 1); with unit k LyCORIS trains at
k times the scale its own file is later applied with, which we do not copy. (A1111's `dyn=r` cuts a
file to rank r but keeps alpha / dim; sd-scripts' extraction, alpha / r, is the one we train for.)

Not applied, as in both references: `dropout` and `rank_dropout` (module dropout is, as LyCORIS
does), DoRA (LyCORIS accepts `dora_wd` for dylora and ignores it: `enable_dora` refuses), Tucker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_train.network.lora import LoRA
from lora_train.network.targets import is_linear
from lora_train.network.module import NetworkModule, describe_target

LYCORIS_BLOCK_SIZE = 4  # LyCORIS' kohya wrapper: `block_size` when network_args leave it out
SD_SCRIPTS_UNIT = 1  # sd-scripts' networks.dylora: `unit` when network_args leave it out


class DyLoRA(LoRA):
    algorithm = "DyLoRA"
    algo = "dylora"

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, *, unit: int = SD_SCRIPTS_UNIT, **options):
        if options:
            raise TypeError(f"{name}: DyLoRA has no option {', '.join(sorted(options))}")
        unit = int(unit)
        if unit < 1 or dim % unit:
            raise ValueError(f"{name}: DyLoRA's rank {dim} must be a multiple of unit {unit}")
        # Not LoRA.__init__: its nn.Linear / nn.Conv2d draw their default init from torch's global
        # RNG. Each block of `unit` ranks is its own Parameter, so a block can be left without a
        # gradient; shaped as LoRA's lora_down / lora_up cut along the rank.
        NetworkModule.__init__(self, name, org, dim, alpha, part)
        self.unit = unit
        self.blocks = dim // unit
        out_dim, in_dim, *kernel = self.target_shape
        ones = [1] * len(kernel)  # lora_up is a 1x1 conv on a conv
        for i in range(self.blocks):
            self.register_parameter(f"down_{i}", nn.Parameter(torch.empty(unit, in_dim, *kernel)))
            self.register_parameter(f"up_{i}", nn.Parameter(torch.empty(out_dim, unit, *ones)))
        self.reset_parameters(generator)
        # the rank r the last training forward used (None before the first; eval leaves it alone)
        self.last_rank: int | None = None

    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        return False  # its files are LoRA files: LoRA / LoCon load them

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        # LoRA's targets and LoCon's: sd-scripts' DyLoRA trains the 3x3 convs with conv_dim
        return is_linear(org) or isinstance(org, (nn.MultiheadAttention, nn.Conv2d))

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None,
                     unit: int = SD_SCRIPTS_UNIT) -> "DyLoRA":
        """A DyLoRA shaped for a LoRA file's weights, to train on (a file does not record the unit:
        ss_network_args does, if anything). LyCORIS' 2D `lora_up` on a conv is taken as (out, dim, 1, 1)."""
        for key in ("lora_down.weight", "lora_up.weight"):
            if key not in weights:
                raise KeyError(f"{name}.{key}: missing (DyLoRA needs lora_down.weight and lora_up.weight)")
        alpha = weights.get("alpha")
        module = cls(name, org, weights["lora_down.weight"].shape[0], float(alpha) if alpha is not None else None, part=part, unit=unit)
        own = module.state_dict()
        for key in ("lora_down.weight", "lora_up.weight"):
            shape, fits = tuple(weights[key].shape), tuple(own[key].shape)
            if shape != fits and shape + (1, 1) != fits:
                raise KeyError(f"{name}.{key}: shape {shape} does not fit {describe_target(org, part)}")
        return module

    def enable_dora(self, wd_on_out: bool = True) -> None:
        raise TypeError(f"{self.lora_name}: DyLoRA has no DoRA (LyCORIS ignores dora_wd for dylora)")

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # LoRA's init (sd-scripts' and LyCORIS' too): down U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn as
        # ONE (dim, in[, kh, kw]) tensor so the values are a LoRA's from the same generator; up zeros
        down = torch.empty(self.lora_dim, *self.down_0.shape[1:])
        bound = 1.0 / down[0].numel() ** 0.5
        down.uniform_(-bound, bound, generator=generator)
        for p, d in zip(self._downs(), down.split(self.unit)):
            p.copy_(d)
        for p in self._ups():
            p.zero_()

    # -- blocks ----------------------------------------------------------------------------
    def _downs(self) -> list[nn.Parameter]:
        return [getattr(self, f"down_{i}") for i in range(self.blocks)]

    def _ups(self) -> list[nn.Parameter]:
        return [getattr(self, f"up_{i}") for i in range(self.blocks)]

    def factors(self, rank: int | None = None, trained_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) of the first `rank` ranks (all by default), shaped as the file has them; with
        `trained_block`, the blocks below it are detached."""
        n = self.blocks if rank is None else rank // self.unit
        downs, ups = self._downs()[:n], self._ups()[:n]
        if trained_block is not None:
            downs = [d.detach() if i < trained_block else d for i, d in enumerate(downs)]
            ups = [u.detach() if i < trained_block else u for i, u in enumerate(ups)]
        return torch.cat(downs), torch.cat(ups, dim=1)

    def _draw_block(self) -> int:
        return min(int(float(self._rand((1,), "cpu")) * self.blocks), self.blocks - 1)

    # -- the change --------------------------------------------------------------------------
    def max_norm_tensor(self) -> torch.Tensor | None:
        return None  # neither sd-scripts' networks.dylora nor LyCORIS' dylora has a max-norm

    def weight_delta(self, rank: int | None = None) -> torch.Tensor:
        """The change the first `rank` ranks make (the whole file's by default) at alpha / rank."""
        rank = self.lora_dim if rank is None else int(rank)
        if rank < 1 or rank > self.lora_dim or rank % self.unit:
            raise ValueError(f"{self.lora_name}: DyLoRA's ranks are multiples of {self.unit} up to {self.lora_dim}, not {rank}")
        down, up = self.factors(rank)
        return (up.flatten(1) @ down.flatten(1)).reshape(self.target_shape) * (self.alpha_value / rank)

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.training and self.dropout_generator is None:
            # a module used outside a network: a generator of its own, so the host's RNG never moves
            self.dropout_generator = torch.Generator().manual_seed(0)
        if self._skipped():
            return None
        if self.training:
            block = self._draw_block()
            rank = (block + 1) * self.unit
            down, up = self.factors(rank, trained_block=block)
            self.last_rank = rank
        else:
            rank = self.lora_dim
            down, up = self.factors()
        scale = self.multiplier * self.alpha_value / rank
        x = x.to(down.dtype)
        org = self.org
        if isinstance(org, nn.Conv2d):
            lx = F.conv2d(x, down, None, org.stride, org.padding, org.dilation)
            return F.conv2d(lx * scale, up)
        return F.linear(F.linear(x, down) * scale, up)

    # -- the file's keys -----------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # alpha, and the blocks, replaced here
        for i in range(self.blocks):
            del destination[f"{prefix}down_{i}"], destination[f"{prefix}up_{i}"]
        down, up = self.factors()
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        given = set()
        for key, block, axis in (("lora_down.weight", "down", 0), ("lora_up.weight", "up", 1)):
            w = state_dict.pop(prefix + key, None)
            if w is None:
                continue
            given.add(key)
            shape = list(getattr(self, f"{block}_0").shape)
            shape[axis] = self.lora_dim
            if tuple(w.shape) + (1, 1) == tuple(shape):
                w = w.reshape(shape)  # LyCORIS writes a conv's lora_up as (out, dim)
            if list(w.shape) != shape:
                error_msgs.append(f"size mismatch for {prefix}{key}: copying a param with shape {tuple(w.shape)}, "
                                  f"the shape in current model is {tuple(shape)}.")
                continue
            for i, part in enumerate(w.split(self.unit, dim=axis)):
                state_dict[f"{prefix}{block}_{i}"] = part
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # report a missing block as the file key it comes from
        for block, key in (("down", "lora_down.weight"), ("up", "lora_up.weight")):
            names = {f"{prefix}{block}_{i}" for i in range(self.blocks)}
            if names & set(missing_keys[before:]):  # (a wrong shape is reported as that, not as missing)
                missing_keys[before:] = [k for k in missing_keys[before:] if k not in names] + ([] if key in given else [prefix + key])
