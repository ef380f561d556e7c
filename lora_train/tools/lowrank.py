"""A weight change as a kohya LoRA module of a given rank: its SVD, sd-scripts' rank rules, and what
the kept rank retains.

The matrix is the change as sd-scripts flattens it: (out, in) for a Linear, (out, in * kh * kw) for
a conv. The best rank-r approximation (Eckart-Young) is U[:, :r] S[:r] Vh[:r]; as sd-scripts writes
it, `lora_up` = U S and `lora_down` = Vh, so the singular values live in the up factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lora_train.errors import UserError, msg

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # sd-scripts: a change whose largest singular value is below this is kept at rank 1


@dataclass
class Factors:
    up: torch.Tensor  # (out, rank): U S
    down: torch.Tensor  # (rank, in * kh * kw): Vh
    singular_values: torch.Tensor  # all of them, largest first
    rank: int

    def retained(self) -> tuple[float, float, float]:
        """sd-scripts' three numbers for the kept rank: sum(S) retained, Frobenius norm retained
        (sqrt of the sum of S^2), and the ratio of the largest to the smallest kept singular value."""
        s = self.singular_values
        r = self.rank
        total = float(s.abs().sum())
        fro = float(s.pow(2).sum().sqrt())
        sum_kept = float(s[:r].abs().sum()) / total if total else float("nan")
        fro_kept = float(s[:r].pow(2).sum().sqrt()) / fro if fro else float("nan")
        largest, smallest = float(s[0]), float(s[r - 1])
        ratio = largest / smallest if smallest else float("nan") if not largest else float("inf")  # 0/0 is NaN, as sd-scripts prints it
        return sum_kept, fro_kept, ratio


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of a 2-D change, in float32 (sd-scripts: its matmul and SVD only work well there)."""
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def dynamic_rank(s: torch.Tensor, method: str, param: float) -> int:
    """The rank sd-scripts' `--dynamic_method` picks from the singular values `s` (largest first).

    Each rule finds a count k (sv_ratio: singular values above S[0] / param; sv_cumulative: the
    first index where the running sum of S reaches `param` of the total, plus one; sv_fro: the same
    on S^2 against param^2), clamps it to 1 .. len(s) - 1, and keeps k + 1 ranks: sd-scripts adds
    one past the count, and we keep its numbers so a file resizes to the same rank in both."""
    n = len(s)
    if method == "sv_ratio":
        k = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        k = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param)))) + 1
    elif method == "sv_fro":
        sq = s.pow(2)
        k = int(torch.searchsorted(torch.cumsum(sq, 0) / sq.sum(), torch.tensor(float(param) ** 2))) + 1
    else:
        raise UserError(msg("--dynamic '{method}': not a method (known: {known})", method=method, known=", ".join(DYNAMIC_METHODS)))
    return max(1, min(k, n - 1)) + 1


def check_dynamic(method: str | None, param: float | None) -> None:
    if method is None:
        if param is not None:
            raise UserError(msg("--param is read with --dynamic only"))
        return
    if method not in DYNAMIC_METHODS:
        raise UserError(msg("--dynamic '{method}': not a method (known: {known})", method=method, known=", ".join(DYNAMIC_METHODS)))
    if param is None or not math.isfinite(param) or param <= 0:
        raise UserError(msg("--dynamic {method} needs --param, a number above 0", method=method))


def factorize(matrix: torch.Tensor, rank: int, dynamic: str | None = None, param: float | None = None,
              own_rank: int | None = None) -> Factors:
    """The change `matrix` (2-D) as up @ down of `rank` (or of the rank the dynamic rule picks,
    at most `rank`), never above `own_rank` (a LoRA's own rank: more directions would only be zeros)."""
    u, s, vh = svd(matrix)
    if float(s[0]) <= MIN_SV:
        r = 1
    else:
        r = dynamic_rank(s, dynamic, param) if dynamic else rank
        r = min(r, rank)
    r = max(1, min(r, len(s), own_rank or len(s)))
    return Factors(up=u[:, :r] * s[:r], down=vh[:r], singular_values=s, rank=r)


def kohya_shapes(f: Factors, target_shape: torch.Size | tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_down, lora_up) shaped as sd-scripts writes them for a target weight of `target_shape`:
    2-D for a Linear; for a conv, down takes the kernel and up is 1x1."""
    if len(target_shape) == 4:
        out, inp, kh, kw = target_shape
        return f.down.reshape(f.rank, inp, kh, kw).contiguous(), f.up.reshape(out, f.rank, 1, 1).contiguous()
    return f.down.contiguous(), f.up.contiguous()


PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(name: str | None) -> torch.dtype:
    """sd-scripts' `--save_precision`: float when not given."""
    if name is None:
        return torch.float32
    if name not in PRECISIONS:
        raise UserError(msg("--save-precision '{value}': not one of {known}", value=name, known=", ".join(PRECISIONS)))
    return PRECISIONS[name]
