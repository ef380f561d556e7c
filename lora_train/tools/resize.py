"""`resize`: a LoRA file at another rank, as sd-scripts' `networks/resize_lora.py` makes it.

Per LoRA / LoCon module: the change up @ down (a conv's down flattened to (rank, in * kh * kw)), its
SVD, and the best approximation of rank N (`--rank`, `--new-conv-rank` for convs larger than 1x1),
or of the rank sd-scripts' dynamic rule picks (at most N). up = U S, down = Vh, and the new alpha
keeps the module's scale: alpha' = (alpha / old rank) * new rank, so the delta is the truncated
delta. A module never grows past its own rank (the extra directions would be zeros).

Modules of other algorithms (LoHa, LoKr, DoRA, IA3, ...) are turned into LoRA / LoCon modules of
rank N through their delta, which needs the targets' shapes: the reference model of the file's
architecture, or `--model` (needed by algorithms whose delta depends on the base weight). Norm
modules are kept as they are. The input is never written.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_train.errors import UserError, msg
from lora_train.network import algorithms
from lora_train.network.files import load_lora, save_lora
from lora_train.tools import deltas, lowrank
from lora_train.tools.cards import write_card
from lora_train.tools.checkpoint import check_output

LORA_KEYS = {"lora_down.weight", "lora_up.weight", "alpha"}
NORM_KEYS = {"w_norm", "b_norm"}


@dataclass
class ModuleResize:
    name: str
    rank: int
    alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float
    algorithm: str = "LoRA"  # what the module was before (LoHa ... when converted)
    conv3x3: bool = False


@dataclass
class ResizeResult:
    path: Path
    modules: list[ModuleResize] = field(default_factory=list)
    old_rank: int = 0
    notes: list[str] = field(default_factory=list)


def _resized(name: str, matrix: torch.Tensor, shape, rank: int, scale: float, dynamic, param, own_rank, dtype, algorithm: str):
    f = lowrank.factorize(matrix, rank, dynamic, param, own_rank)
    down, up = lowrank.kohya_shapes(f, shape)
    alpha = float(scale * f.rank)
    sum_kept, fro_kept, ratio = f.retained()
    tensors = {f"{name}.lora_down.weight": down.to(dtype), f"{name}.lora_up.weight": up.to(dtype),
               f"{name}.alpha": torch.tensor(alpha).to(dtype)}
    return tensors, ModuleResize(name, f.rank, alpha, sum_kept, fro_kept, ratio, algorithm, _is_conv3x3(shape))


def _is_conv3x3(shape) -> bool:
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def _network(others: dict[str, torch.Tensor], metadata: dict[str, str], model: str | None, path: Path):
    """The non-LoRA modules of the file as LoRA Train loads them: over `model`'s targets, else stand-ins."""
    targets = None
    if model:
        from lora_train.model.registry import load_adapter

        targets = load_adapter(model).file_targets()
    return deltas.network_of(others, metadata, str(path), targets)


def resize(src: str | os.PathLike, dst: str | os.PathLike, rank: int, conv_rank: int | None = None, dynamic: str | None = None,
           param: float | None = None, save_precision: str | None = None, model: str | None = None) -> ResizeResult:
    src = Path(src)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError(msg("--rank and --new-conv-rank must be at least 1"))
    lowrank.check_dynamic(dynamic, param)
    param = None if param is None else float(param)  # sd-scripts' --dynamic_param is a float, and its comment shows it so
    conv_rank = conv_rank or rank
    dtype = lowrank.save_dtype(save_precision)
    out = check_output(dst, [src], "OUT")
    tensors, metadata = load_lora(src)
    algorithms.check_keys(tensors)
    result = ResizeResult(out)
    new: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, suffixes in algorithms.group(tensors).items():
            keys = {s: tensors[f"{name}.{s}"] for s in suffixes}
            if suffixes <= LORA_KEYS and {"lora_down.weight", "lora_up.weight"} <= suffixes:
                down, up = keys["lora_down.weight"].float(), keys["lora_up.weight"].float()
                old = down.shape[0]
                result.old_rank = max(result.old_rank, old)
                scale = float(keys["alpha"]) / old if "alpha" in keys else 1.0  # sd-scripts: no alpha is scale 1
                shape = (up.shape[0], *down.shape[1:])
                part, row = _resized(name, up.flatten(1) @ down.flatten(1), shape, conv_rank if _is_conv3x3(down.shape) else rank,
                                     scale, dynamic, param, old, dtype, "LoRA")
            elif suffixes <= NORM_KEYS:
                new.update({f"{name}.{s}": v for s, v in keys.items()})  # a vector: nothing to resize
                continue
            else:
                others.update({f"{name}.{s}": v for s, v in keys.items()})
                continue
            new.update(part)
            result.modules.append(row)
        if others:
            for module in _network(others, metadata, model, src).lora_modules.values():
                delta = module.delta().float()
                bias = hasattr(module, "bias_delta") and module.bias_delta() is not None and bool(module.bias_delta().any())
                result.old_rank = max(result.old_rank, module.lora_dim)
                r = conv_rank if _is_conv3x3(delta.shape) else rank
                part, row = _resized(module.lora_name, delta.reshape(delta.shape[0], -1), delta.shape, r, 1.0, dynamic, param, None, dtype,
                                     module.algorithm)
                new.update(part)
                result.modules.append(row)
                if bias:
                    result.notes.append(msg("{name}: its bias change cannot be held by a LoRA and is left out", name=module.lora_name))
            kinds = sorted({m.algorithm for m in result.modules if m.algorithm != "LoRA"})
            result.notes.append(msg("{count} {algorithms} modules were turned into LoRA / LoCon modules through their delta",
                                    count=sum(m.algorithm != "LoRA" for m in result.modules), algorithms="/".join(kinds)))
    save_lora(out, new, _metadata(metadata, result, rank, conv_rank, dynamic, param, bool(others)))
    family = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[deltas.family_of(tensors, metadata)]
    write_card(out, family, _card_note(src, rank, conv_rank, dynamic, param), source=src)
    return result


def average_retention(modules: list[ModuleResize]) -> str | None:
    """sd-scripts' closing line: the mean and spread of the modules' Frobenius norm retention
    (an all-zero module's NaN left out, as sd-scripts does); None when no module counts."""
    kept = [m.fro_retained for m in modules if m.fro_retained == m.fro_retained]
    if not kept:
        return None
    return msg("Average Frobenius norm retention: {mean} | std: {std}", mean=f"{statistics.fmean(kept):.2%}",
               std=f"{statistics.pstdev(kept):0.3f}")


def _card_note(src: Path, rank: int, conv_rank: int, dynamic, param) -> str:
    if dynamic:
        return msg("resized from {source} with {method} {param} (at most rank {rank})", source=src.name, method=dynamic, param=param, rank=rank)
    return msg("resized from {source} to rank {rank} (conv {conv})", source=src.name, rank=rank, conv=conv_rank)


def _metadata(metadata: dict[str, str], result: ResizeResult, rank: int, conv_rank: int, dynamic, param, converted: bool) -> dict[str, str]:
    """sd-scripts' updates: ss_training_comment says what was done (before the old comment),
    ss_network_dim / ss_network_alpha the new ones ("Dynamic" with a dynamic method)."""
    md = {k: v for k, v in metadata.items() if not k.startswith("sshs_") and k != "modelspec.hash_sha256"}
    comment = metadata.get("ss_training_comment", "")
    if dynamic:
        md["ss_training_comment"] = f"Dynamic resize with {dynamic}: {param} from {result.old_rank}; {comment}"
        md["ss_network_dim"] = md["ss_network_alpha"] = "Dynamic"
    else:
        conv = "" if conv_rank == rank else f" (conv: {conv_rank})"
        md["ss_training_comment"] = f"dimension is resized from {result.old_rank} to {rank}{conv}; {comment}"
        md["ss_network_dim"] = str(rank)
        # the alpha of the modules at the new rank (an all-zero module is kept at rank 1, as in sd-scripts)
        linear = {m.alpha for m in result.modules if not m.conv3x3 and m.rank == rank} or {m.alpha for m in result.modules if not m.conv3x3}
        md["ss_network_alpha"] = str(linear.pop()) if len(linear) == 1 else "Dynamic"  # modules of different scales
    if converted:  # the file is a plain LoRA / LoCon now: what loaders and config-from-lora read must say so
        md["ss_network_module"] = "networks.lora"
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if any(m.conv3x3 for m in result.modules) else {}
        md["ss_network_args"] = json.dumps(args)
    return md
