"""LoKr (LyCORIS `algo=lokr`): the weight change is a Kronecker product, dW = scale * (w1 (x) w2).

The target's out and in sizes are each split into two factors (`factorization`): out = l * k,
in = m * n. w1 is (l, m) and w2 is (k, n[, kh, kw]); either half may itself be a rank-`dim` product.
File keys under the module name, shaped as LyCORIS 4.1.3's `LokrModule` shapes them:

- `lokr_w1` (l, m), or `lokr_w1_a` (l, dim) and `lokr_w1_b` (dim, m) with `decompose_both` when
  dim < max(l, m) / 2;
- `lokr_w2` (k, n[, kh, kw]) when dim >= max(k, n) / 2 or `full_matrix`; else `lokr_w2_a` (k, dim)
  and `lokr_w2_b` (dim, n * kh * kw), or with `use_tucker` on a kxk conv `lokr_t2` (dim, dim, kh, kw),
  `lokr_w2_a` (dim, k) and `lokr_w2_b` (dim, n);
- `alpha`. scale = alpha / dim, except when both halves are full matrices: then LyCORIS stores
  alpha = dim, so scale = 1, and the WebUI (no `lokr_w1_b` / `lokr_w2_b` to read a rank from)
  ignores alpha entirely. `scale` is 1 in that mode whatever the file's alpha says.

`use_scalar`: a trained scalar, starting at 0, multiplies dW, so that w2 can start random instead of
zero. LyCORIS saves it folded into `lokr_w1` (or `lokr_w1_a`) and resets it to 1 on loading; so do we.
`rank_dropout` drops whole ROWS of dW (output channels) in training, as LyCORIS does for LoKr;
`rank_dropout_scale` rescales the kept rows by 1 / their fraction. LyCORIS ignores plain `dropout`
for LoKr outside its bypass mode, and so do we.

Not supported (TypeError): `rs_lora` (with both halves full, LyCORIS trains at scale sqrt(dim) but
writes a file every loader, LyCORIS' own included, reads at scale 1), and `bypass_mode` (same result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lora_train.network.module import NetworkModule, describe_target, target_weight_shape
from lora_train.network.targets import is_linear


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(small, large) with small * large == dimension, as LyCORIS' `factorization` picks them.

    A positive factor that divides the dimension is used as it is. Otherwise the divisors are walked
    upwards, never past `factor` (no limit when negative), and the walk stops at the first divisor
    at or beyond the square root: the most balanced split the limit allows."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor < 0 else factor
    m = 1
    while m < dimension // m:
        following = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if following > limit:
            break
        m = following
    return tuple(sorted((m, dimension // m)))


@dataclass(frozen=True)
class Layout:
    """Which LoKr tensors a module has, and their sizes: out = out_l * out_k, in = in_m * in_n."""
    out_l: int
    out_k: int
    in_m: int
    in_n: int
    kernel: tuple[int, ...]  # () for a Linear
    w1_rank: int | None  # None: `lokr_w1` is a full (l, m) matrix
    w2_rank: int | None  # None: `lokr_w2` is a full (k, n, *kernel) tensor
    tucker: bool  # w2 from `lokr_t2` and two 1-mode factors

    @classmethod
    def plan(cls, shape: torch.Size, dim: int, factor: int, decompose_both: bool, use_tucker: bool,
             full_matrix: bool, unbalanced: bool) -> "Layout":
        out_dim, in_dim, *kernel = shape
        out_l, out_k = factorization(out_dim, factor)
        in_m, in_n = factorization(in_dim, factor)
        if unbalanced:  # LyCORIS' unbalanced_factorization: the larger out factor goes to w1
            out_l, out_k = out_k, out_l
        # LyCORIS' rule: a half is only factorised when dim is below half its larger side; else
        # the "low-rank" product would hold more numbers than the matrix itself
        w1_rank = dim if decompose_both and not full_matrix and dim < max(out_l, in_m) / 2 else None
        w2_rank = None if full_matrix or dim >= max(out_k, in_n) / 2 else dim
        tucker = use_tucker and w2_rank is not None and any(s != 1 for s in kernel)
        return cls(out_l, out_k, in_m, in_n, tuple(kernel), w1_rank, w2_rank, tucker)

    @property
    def full(self) -> bool:
        return self.w1_rank is None and self.w2_rank is None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this layout has (`alpha` aside), by file key."""
        k = self.kernel
        shapes: dict[str, tuple[int, ...]] = {}
        if self.w1_rank is None:
            shapes["lokr_w1"] = (self.out_l, self.in_m)
        else:
            shapes["lokr_w1_a"] = (self.out_l, self.w1_rank)
            shapes["lokr_w1_b"] = (self.w1_rank, self.in_m)
        r = self.w2_rank
        if r is None:
            shapes["lokr_w2"] = (self.out_k, self.in_n, *k)
        elif self.tucker:
            shapes["lokr_t2"] = (r, r, *k)
            shapes["lokr_w2_a"] = (r, self.out_k)
            shapes["lokr_w2_b"] = (r, self.in_n)
        else:  # the kernel rides on w2_b, flattened into its columns
            shapes["lokr_w2_a"] = (self.out_k, r)
            shapes["lokr_w2_b"] = (r, self.in_n * math.prod(k))
        return shapes


_OPTIONS = {"factor": -1, "decompose_both": False, "use_tucker": False, "use_scalar": False, "full_matrix": False,
            "unbalanced_factorization": False, "rank_dropout_scale": False}


def _flag(value) -> bool:
    # network args may arrive as text; bool("False") would be True
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class LoKr(NetworkModule):
    algorithm = "LoKr"
    SCALES_WITH = ("lokr_w1", "lokr_w1_a")  # kron(w1, w2) is linear in w1
    algo = "lokr"
    suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")
    optional = suffixes  # every key has an alternative; `claims` says which combinations make a module
    extra_options = tuple(_OPTIONS)  # read from **options

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float | None, generator: torch.Generator | None = None,
                 part: str | None = None, *, layout: Layout | None = None, **options):
        super().__init__(name, org, dim, alpha, part)
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"{name}: LoKr has no option {', '.join(unknown)} (it has {', '.join(_OPTIONS)})")
        opts = _OPTIONS | options
        if layout is None:
            layout = Layout.plan(self.target_shape, self.lora_dim, int(opts["factor"]), _flag(opts["decompose_both"]),
                                 _flag(opts["use_tucker"]), _flag(opts["full_matrix"]),
                                 _flag(opts["unbalanced_factorization"]))
        self.layout = layout
        self.rank_dropout_scale = _flag(opts["rank_dropout_scale"])
        for key, shape in layout.shapes().items():
            setattr(self, key, nn.Parameter(torch.empty(shape)))
        if layout.full:  # LyCORIS: alpha = dim, so the file says scale 1 too
            self.alpha.fill_(float(self.lora_dim))
            self.alpha_value = float(self.lora_dim)
        self.scalar = nn.Parameter(torch.zeros(())) if _flag(opts["use_scalar"]) else None
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # LyCORIS: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), everywhere but
        # the last factor of w2 (lokr_w2, or lokr_w2_b), which is zero so that dW starts at 0. With
        # use_scalar that one is random too: the scalar, 0, does the zeroing. Our own generator (a
        # fresh one when none is given) so the host's global RNG never moves.
        if generator is None:
            generator = torch.Generator()
        zero = "lokr_w2" if self.layout.w2_rank is None else "lokr_w2_b"
        for key in self.layout.shapes():
            w = getattr(self, key)
            if key == zero and self.scalar is None:
                w.zero_()
            else:
                bound = 1.0 / math.sqrt(w[0].numel())
                w.uniform_(-bound, bound, generator=generator)
        if self.scalar is not None:
            self.scalar.zero_()

    # -- which files and targets --------------------------------------------------------------
    @classmethod
    def claims(cls, suffixes: set[str]) -> bool:
        # both halves must be there, each whole or as its two factors (what the WebUI's loader asks)
        def half(i: int) -> bool:
            return f"lokr_w{i}" in suffixes or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= suffixes
        return half(1) and half(2)

    @classmethod
    def accepts(cls, org: nn.Module, part: str | None = None) -> bool:
        return is_linear(org) or isinstance(org, (nn.Conv2d, nn.MultiheadAttention))

    @classmethod
    def from_weights(cls, name: str, org: nn.Module, weights: dict[str, torch.Tensor], part: str | None = None) -> "LoKr":
        shape = target_weight_shape(org)
        out_dim, in_dim, *kernel = shape
        what = describe_target(org, part)

        def misfit(key: str, expected=None) -> KeyError:
            hint = f" (expected {tuple(expected)})" if expected is not None else ""
            return KeyError(f"{name}.{key}: shape {tuple(weights[key].shape)} does not fit {what}{hint}")

        def missing(key: str, why: str) -> KeyError:
            return KeyError(f"{name}.{key}: missing ({why})")

        # w1 fixes the out and in splits; everything else must then agree with them
        if "lokr_w1" in weights:
            w1_key, w1_shape, w1_rank = "lokr_w1", tuple(weights["lokr_w1"].shape), None
            if len(w1_shape) != 2:
                raise misfit("lokr_w1")
        elif "lokr_w1_a" in weights or "lokr_w1_b" in weights:
            for key, other in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w1_b", "lokr_w1_a")):
                if key not in weights:
                    raise missing(key, f"{other} needs it")
                if weights[key].dim() != 2:
                    raise misfit(key)
            w1_rank = weights["lokr_w1_b"].shape[0]
            if weights["lokr_w1_a"].shape[1] != w1_rank:
                raise misfit("lokr_w1_b", (weights["lokr_w1_a"].shape[1], weights["lokr_w1_b"].shape[1]))
            w1_key, w1_shape = "lokr_w1_a", (weights["lokr_w1_a"].shape[0], weights["lokr_w1_b"].shape[1])
        else:
            raise missing("lokr_w1", "LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        out_l, in_m = w1_shape
        if out_l == 0 or in_m == 0 or out_dim % out_l or in_dim % in_m:
            raise misfit(w1_key)

        if "lokr_w2" in weights:
            w2_rank, tucker = None, False
            if "lokr_t2" in weights:
                raise KeyError(f"{name}.lokr_t2: goes with lokr_w2_a and lokr_w2_b, not with lokr_w2")
        elif "lokr_w2_a" not in weights and "lokr_w2_b" not in weights:
            raise missing("lokr_w2", "LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b")
        else:
            for key, other in (("lokr_w2_a", "lokr_w2_b"), ("lokr_w2_b", "lokr_w2_a")):
                if key not in weights:
                    raise missing(key, f"{other} needs it")
            if weights["lokr_w2_b"].dim() != 2:
                raise misfit("lokr_w2_b")
            w2_rank, tucker = weights["lokr_w2_b"].shape[0], "lokr_t2" in weights  # the WebUI reads the rank there too
            if w1_rank is not None and w2_rank != w1_rank:
                raise KeyError(f"{name}.lokr_w2_b: rank {w2_rank} differs from lokr_w1_b's {w1_rank}")
        if tucker and not kernel:
            raise KeyError(f"{name}.lokr_t2: a Tucker core needs a conv target, not {what}")

        layout = Layout(out_l, out_dim // out_l, in_m, in_dim // in_m, tuple(kernel), w1_rank, w2_rank, tucker)
        for key, expected in layout.shapes().items():
            if tuple(weights[key].shape) != expected:
                raise misfit(key, expected)
        alpha = weights.get("alpha")
        dim = w1_rank or w2_rank or 1  # both halves full: no rank anywhere, and scale is 1 anyway (LyCORIS: 1)
        return cls(name, org, dim, float(alpha) if alpha is not None else None, part=part, layout=layout)

    # -- the change ----------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return 1.0 if self.layout.full else self.alpha_value / self.lora_dim

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a @ self.lokr_w1_b

    def _w2(self) -> torch.Tensor:
        lay = self.layout
        if lay.w2_rank is None:
            return self.lokr_w2
        if lay.tucker:  # core (r, r, kh, kw) times a 1-mode factor on each of its first two axes
            return torch.einsum("i j ..., i p, j r -> p r ...", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(lay.out_k, lay.in_n, *lay.kernel)

    def _factor(self) -> torch.Tensor | float:
        """scale, times the trained scalar when there is one."""
        return self.scale if self.scalar is None else self.scale * self.scalar

    def _row_mask(self, rows: int, device, dtype) -> torch.Tensor | None:
        """LyCORIS' LoKr rank dropout: a keep mask over dW's rows (output channels), or None."""
        if not (self.training and self.rank_dropout):
            return None
        keep = (self._rand((rows,), device) > self.rank_dropout).to(dtype)
        if self.rank_dropout_scale:
            # LyCORIS divides by the mean, which is 0/0 when every row dropped; we keep zeros then
            keep = keep / keep.mean().clamp(min=1.0 / rows)
        return keep

    def max_norm_tensor(self) -> torch.Tensor | None:
        return self.weight_delta()

    def weight_delta(self) -> torch.Tensor:
        w1 = self._w1()
        w1 = w1.reshape(*w1.shape, *[1] * len(self.layout.kernel))  # kron pairs axes, so w1 gets 1x1 "kernel" axes
        delta = torch.kron(w1, self._w2().contiguous()) * self._factor()
        mask = self._row_mask(delta.shape[0], delta.device, delta.dtype)
        if mask is not None:
            delta = delta * mask.reshape(-1, *[1] * (delta.dim() - 1))
        return delta

    def forward_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        # A Linear target has a cheaper exact path (LyCORIS' bypass): dW x = vec(w1 X w2^T) with X
        # the input's features as an (m, n) matrix, without building the (out, in) dW.
        if self.dora_scale is not None or self.layout.kernel:
            return super().forward_delta(x)
        if self._skipped():
            return None
        lay = self.layout
        h = x.to(self._w1_dtype()).reshape(*x.shape[:-1], lay.in_m, lay.in_n)
        if lay.w2_rank is None:
            h = h @ self.lokr_w2.T
        else:
            h = (h @ self.lokr_w2_b.T) @ self.lokr_w2_a.T  # (..., m, k)
        h = self._w1() @ h  # (..., l, k)
        y = h.reshape(*x.shape[:-1], lay.out_l * lay.out_k)
        mask = self._row_mask(y.shape[-1], y.device, y.dtype)
        if mask is not None:
            y = y * mask
        return y * (self._factor() * self.multiplier)

    def _w1_dtype(self) -> torch.dtype:
        return (self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a).dtype

    # -- use_scalar in files, as LyCORIS has it ------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.scalar is not None:
            # files carry no scalar: it is folded into w1 (a factor of every entry of dW)
            scalar = destination.pop(prefix + "scalar")
            key = prefix + ("lokr_w1" if self.layout.w1_rank is None else "lokr_w1_a")
            folded = destination[key] * scalar
            destination[key] = folded if keep_vars else folded.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._scalar_loaded(prefix, missing_keys)  # what was loaded already holds the scalar (folded into w1): LyCORIS sets it to 1


