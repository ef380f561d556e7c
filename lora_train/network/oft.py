"""LyCORIS' orthogonal finetuning: Diag-OFT (`algo=diag-oft`) and BOFT (`algo=boft`).

OFT does not add a low-rank term: it ROTATES the target's output channels. The weight's rows are cut
into blocks and each block is multiplied by an orthogonal R, the Cayley transform of a trained
matrix B: Q = B - B^T (skew-symmetric), R = (I + Q)(I - Q)^-1. B = 0 gives R = I, so a fresh module
(B zeros, as LyCORIS starts it) changes nothing, and no random values are drawn at all.

- Diag-OFT: one block-diagonal R; block k of rows becomes R_k^T W_k (LyCORIS contracts over R's
  first index, and so does A1111). `oft_blocks`: (blocks, size, size).
- BOFT: a product of `stages` butterfly factors; stage i mixes each row with the row 2^i * size/2
  away, so after all stages every channel can reach every other. `oft_blocks`: (stages, blocks,
  size, size), stages = log2(blocks) + 1.

File keys (LyCORIS 4.1.3's, read by A1111 v1.10's `network_oft.py`, which tells the two apart by the
number of dimensions of `oft_blocks`: 3 = "kohya / new LyCORIS OFT", 4 = BOFT; both classes here
have the same suffixes, so `fits(weights)` says which one a file's module is):
- `oft_blocks` as above;
- `rescale` (option `rescaled`): a trained factor per output channel, (out, 1[, 1, 1]), starting at 1;
- `alpha`: NOT a scale. LyCORIS stores the `constraint` option there and ignores network_alpha for
  OFT: ||Q|| (all blocks together) is capped at constraint * out (0: no cap). The scale is 1.

dim (network_dim, conv_dim for kxk convs; LyCORIS' kohya wrapper reads its `block_size` for DyLoRA
only) picks the split of `out` channels, as LyCORIS' factorizations do:
- Diag-OFT: when dim divides out, the blocks are dim and out/dim channels, whichever is SMALLER is the
  block size (dim 4 on 320 channels: 80 blocks of 4; dim 4 on 8: 4 blocks of 2); otherwise the
  largest divisor of out that is <= dim, stopping at the first divisor >= sqrt(out) (dim -1: that
  balanced split). It never fails (worst case 1x1 blocks, which cannot rotate anything).
- BOFT: the block size is the largest EVEN divisor b <= dim of out such that out/b is a power of two
  (dim -1: no limit); when none exists (320 channels need b >= 10) the module cannot be built.

The multiplier m is LyCORIS', not a plain factor on the change: Diag-OFT uses m(R - I) + I for R,
BOFT interpolates every stage, m R_i + (1 - m) I, and with `rescaled` the rescale is applied in full
at every m: dW(m) = rescale * W(m) - W. A1111 scales the whole dW by m instead; the two agree at
m = 1, and for Diag-OFT without rescale at every m.

Training: rank dropout (Diag-OFT only, as in LyCORIS) drops single entries of m R in training and
rescales the rest by 1/(1 - p). LyCORIS' plain `dropout` applies only in its bypass mode, BOFT has no
rank dropout, and neither has DoRA (LyCORIS ignores `dora_wd` for them): those are not applied here.
kohya's own networks.oft (sd-scripts) writes the same 3D `oft_blocks` with its block COUNT = dim and
always caps ||Q|| (a constraint of 0 stops it); it is not a separate class here.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lora_train.network.module import NetworkModule, describe_target, target_weight_shape
from lora_train.network.targets import is_linear


def diag_split(out: int, dim: int) -> tuple[int, int]:
    """(block size, block count) of Diag-OFT with `dim` on `out` channels (LyCORIS' `factorization`)."""
    if dim > 0 and out % dim == 0:
        pair = (dim, out // dim)
    else:
        limit = out if dim < 0 else dim
        size = 1
        for d in range(2, out + 1):
            if out % d:
                continue
            if d > limit:
                break
            size = d
            if d >= out // d:  # past the balanced split: growing further only makes blocks bigger
                break
        pair = (size, out // size)
    return min(pair), max(pair)


def butterfly_split(out: int, dim: int) -> tuple[int, int] | None:
    """(block size, block count) of BOFT with `dim` on `out` channels (LyCORIS' `power2factorization`),
    or None when no even block size <= dim leaves a power-of-two count."""
    limit = out if dim == -1 else min(dim, out)
    sizes = [b for b in range(2, limit + 1, 2) if out % b == 0 and _power_of_two(out // b)]
    return (sizes[-1], out // sizes[-1]) if sizes else None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def cayley(blocks: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The orthogonal R = (I + Q)(I - Q)^-1 of each trailing square of `blocks`, Q = B - B^T, with ||Q||
    (over every block at once) capped at `max_norm` when that is > 0."""
    if blocks.dtype in (torch.float16, torch.bfloat16):
        blocks = blocks.float()  # no half-precision solve; LyCORIS inverts in float32 too
    q = blocks - blocks.transpose(-1, -2)
    if max_norm > 0:
        # LyCORIS scales Q to max_norm / (||Q|| + 1e-8) when that is below 1; a clamp keeps it a
        # tensor op, so the check costs no GPU sync
        q = q * (max_norm / (q.norm() + 1e-8)).clamp(max=1.0)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    # I + Q and (I - Q)^-1 commute, so R is also (I - Q)^-1 (I + Q): one solve, no explicit inverse
    return torch.linalg.solve(eye - q, eye + q)




class _OFT(NetworkModule):
    """What Diag-OFT and BOFT share: the keys, the constraint in `alpha`, `rescale`, file checks."""

    suffixes = ("oft_blocks", "rescale", "alpha")
    optional = ("rescale", "alpha")
    blocks_ndim: ClassVar[int]

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, *, constraint: float = 0.0, rescaled: bool = False, **options):
        # `alpha` is accepted for the common signature and ignored, as LyCORIS ignores network_alpha
        # for OFT; `generator` too: OFT starts at exactly zero, nothing is drawn
        if options:
            raise TypeError(f"{name}: {self.algorithm} has no option {', '.join(sorted(options))}")
        super().__init__(name, org, dim, alpha, part)
        self.out_dim = self.target_shape[0]
        # the `alpha` key holds the constraint (what LyCORIS writes and A1111 reads back)
        self.alpha.fill_(float(constraint))
        self.alpha_value = float(constraint)
        self._build(self._layout(self.out_dim, self.lora_dim))
        self.rescaled = bool(rescaled)
        if self.rescaled:
            self.rescale = nn.Parameter(torch.ones(self.out_dim, *[1] * (len(self.target_shape) - 1)))

    @property
    def scale(self) -> float:
        return 1.0  # a rotation has no alpha / dim scale

    @property
    def constraint(self) -> float:
        """The cap on ||Q||: LyCORIS' constraint times the output channels (0: none)."""
        return self.alpha_value * self.out_dim

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        # the rotation acts on output channels only, so any Conv2d kernel, stride or groups is fine
        return is_linear(org) or isinstance(org, (nn.Conv2d, nn.MultiheadAttention))

    @classmethod
    def fits(cls, weights: dict[str, torch.Tensor]) -> bool:
        """Whether a file module's `oft_blocks` is this class's (3D: Diag-OFT, 4D: BOFT)."""
        blocks = weights.get("oft_blocks")
        return blocks is not None and blocks.dim() == cls.blocks_ndim

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "_OFT":
        blocks = weights.get("oft_blocks")
        if blocks is None:
            raise KeyError(f"{name}.oft_blocks: missing ({cls.algorithm} needs it)")
        shape = target_weight_shape(org)
        layout = cls._file_layout(tuple(blocks.shape), shape[0])
        if layout is None:
            raise KeyError(f"{name}.oft_blocks: shape {tuple(blocks.shape)} does not fit {describe_target(org, part)} "
                           f"as {cls.algorithm}'s {cls._layout_text}")
        rescale = weights.get("rescale")
        want = (shape[0], *[1] * (len(shape) - 1))
        if rescale is not None and tuple(rescale.shape) != want:
            raise KeyError(f"{name}.rescale: shape {tuple(rescale.shape)} does not fit {describe_target(org, part)} (needs {want})")
        alpha = weights.get("alpha")
        module = cls(name, org, layout[-1], None, part=part, constraint=float(alpha) if alpha is not None else 0.0,
                     rescaled=rescale is not None)
        if module.layout != layout:  # a layout LyCORIS' own split would not pick for this dim, but A1111 reads
            module._build(layout)
        return module

    def enable_dora(self, wd_on_out: bool = True) -> None:
        raise TypeError(f"{self.lora_name}: {self.algorithm} has no DoRA (LyCORIS ignores dora_wd for it)")

    def delta(self) -> torch.Tensor:
        # not weight_delta() * multiplier: LyCORIS puts the multiplier inside the rotation (module docstring)
        return self._delta_at(self.multiplier)

    def weight_delta(self) -> torch.Tensor:
        return self._delta_at(1.0)

    def max_norm_tensor(self) -> torch.Tensor | None:
        return self.oft_blocks  # LyCORIS caps the blocks themselves, not the weight change they make

    def scale_max_norm_(self, ratio: torch.Tensor) -> None:
        self.oft_blocks.mul_(ratio.to(self.oft_blocks.dtype))

    def _rescaled(self, rotated: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rescale * rotated - weight: the change, with the rescale at full strength."""
        return (rotated * self.rescale if self.rescaled else rotated) - weight

    # what a subclass gives
    _layout_text: ClassVar[str]

    @classmethod
    def _layout(cls, out: int, dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    @classmethod
    def _file_layout(cls, shape: tuple[int, ...], out: int) -> tuple[int, ...] | None:
        raise NotImplementedError

    def _build(self, layout: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _delta_at(self, multiplier: float) -> torch.Tensor:
        raise NotImplementedError


class DiagOFT(_OFT):
    algorithm = "Diag-OFT"
    algo = "diag-oft"
    blocks_ndim = 3
    _layout_text = "(blocks, size, size) with blocks * size = out"

    @classmethod
    def _layout(cls, out: int, dim: int) -> tuple[int, int]:
        size, count = diag_split(out, dim)
        return count, size

    @classmethod
    def _file_layout(cls, shape, out):
        # any count * size = out: LyCORIS writes count >= size, kohya's OFT may write count < size
        if len(shape) == 3 and shape[1] == shape[2] and shape[0] * shape[1] == out:
            return shape[0], shape[1]
        return None

    def _build(self, layout: tuple[int, int]) -> None:
        self.layout = layout
        self.block_num, self.block_size = layout
        self.oft_blocks = nn.Parameter(torch.zeros(self.block_num, self.block_size, self.block_size))

    def _delta_at(self, multiplier: float) -> torch.Tensor:
        r = cayley(self.oft_blocks, self.constraint)
        weight = self.org_weight().to(r.dtype)
        rotation = r * multiplier
        if self.training and self.rank_dropout:
            # LyCORIS drops entries of m R itself (the identity below is added back undropped)
            keep = self._rand(rotation.shape, rotation.device) > self.rank_dropout
            rotation = rotation * keep / (1.0 - self.rank_dropout)
        eye = torch.eye(self.block_size, dtype=r.dtype, device=r.device)
        rotation = rotation + (1.0 - multiplier) * eye  # m (R - I) + I: identity at m = 0
        rows = weight.reshape(self.block_num, self.block_size, *weight.shape[1:])
        rotated = torch.einsum("knm,kn...->km...", rotation, rows).reshape(weight.shape)
        return self._rescaled(rotated, weight).to(self.oft_blocks.dtype)


class BOFT(_OFT):
    algorithm = "BOFT"
    algo = "boft"
    blocks_ndim = 4
    _layout_text = "(stages, blocks, size, size) with blocks a power of two, size even, blocks * size = out"

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, **options):
        out = target_weight_shape(org)[0] if self.accepts(org, part) else None
        if out is not None and butterfly_split(out, int(dim)) is None:
            raise ValueError(f"{name}: BOFT cannot split {out} channels into blocks of an even size <= {dim} "
                             f"whose count is a power of two; use a larger dim (or -1)")
        super().__init__(name, org, dim, alpha, generator, part, **options)

    @classmethod
    def _layout(cls, out: int, dim: int) -> tuple[int, int, int]:
        size, count = butterfly_split(out, dim)
        return count.bit_length(), count, size  # log2(count) + 1 stages

    @classmethod
    def _file_layout(cls, shape, out):
        # fewer stages than log2(blocks) + 1 still make a valid product (A1111 reads any count)
        if (len(shape) == 4 and shape[2] == shape[3] and shape[1] * shape[2] == out and shape[2] % 2 == 0
                and _power_of_two(shape[1]) and 1 <= shape[0] <= shape[1].bit_length()):
            return shape[0], shape[1], shape[2]
        return None

    def _build(self, layout: tuple[int, int, int]) -> None:
        self.layout = layout
        self.stages, self.block_num, self.block_size = layout
        self.oft_blocks = nn.Parameter(torch.zeros(self.stages, self.block_num, self.block_size, self.block_size))

    def _delta_at(self, multiplier: float) -> torch.Tensor:
        r = cayley(self.oft_blocks, self.constraint)
        if multiplier != 1:
            eye = torch.eye(self.block_size, dtype=r.dtype, device=r.device)
            r = r * multiplier + (1.0 - multiplier) * eye
        weight = self.org_weight().to(r.dtype)
        rotated = weight
        for i in range(self.stages):
            rotated = self._stage(rotated, r[i], (self.block_size // 2) << i)
        return self._rescaled(rotated, weight).to(self.oft_blocks.dtype)

    def _stage(self, rows: torch.Tensor, r: torch.Tensor, stride: int) -> torch.Tensor:
        """One butterfly factor: pair each row with the one `stride` rows on, gather size/2 such
        pairs into a block, rotate the block by R, and put the rows back where they were."""
        rest = rows.shape[1:]
        paired = rows.reshape(-1, 2, stride, *rest).transpose(1, 2)  # (groups, stride, 2, ...)
        blocks = paired.reshape(self.block_num, self.block_size, *rest)
        blocks = torch.einsum("bij,bj...->bi...", r, blocks)
        return blocks.reshape(-1, stride, 2, *rest).transpose(1, 2).reshape(rows.shape)
