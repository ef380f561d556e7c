"""`extract`: a LoRA (LoCon with a conv rank) from the weight difference of two checkpoints of one
family, as sd-scripts' `networks/extract_lora_from_models.py` makes it.

Per LoRA Train target (kohya names from the adapter's `lora_targets`): the tuned weight minus the
base weight, flattened as sd-scripts does, its best rank-N approximation by SVD, `lora_up` = U S,
`lora_down` = Vh, both clamped to the `clamp_quantile` of their values (sd-scripts' 0.99 cuts the
rare large entries; 1 keeps them all), alpha = rank. The text encoder is extracted only when some
weight of it differs by more than `min_diff` (sd-scripts' 0.01); a fused attention part is its rows
of `in_proj_weight`.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_train.errors import UserError, msg
from lora_train.network.files import save_lora
from lora_train.tools import lowrank
from lora_train.tools.cards import write_card
from lora_train.tools.checkpoint import Locator, check_output, read_checkpoint


@dataclass
class ExtractResult:
    path: Path
    modules: int = 0
    text_encoder: bool = True  # False: the text encoders were the same (UNet only)
    largest_te_diff: float = 0.0
    notes: list[str] = field(default_factory=list)


def clamped(f: lowrank.Factors, quantile: float) -> lowrank.Factors:
    """sd-scripts' clamp: both factors to +-(the `quantile` of their values together)."""
    if quantile >= 1:
        return f
    values = torch.cat([f.up.flatten(), f.down.flatten()])
    if values.numel() > 16_000_000:  # torch.quantile's input limit; a sorted pick is the same number
        hi = values.sort().values[int(round(quantile * (values.numel() - 1)))]
    else:
        hi = torch.quantile(values, quantile)
    return lowrank.Factors(f.up.clamp(-hi, hi), f.down.clamp(-hi, hi), f.singular_values, f.rank)


def _differences(adapter, tuned: dict[str, torch.Tensor], tuned_path: Path, conv: bool):
    locator = Locator(adapter.model)
    for t in adapter.lora_targets(conv=conv):
        weight = t.module.weight if t.part is None else _part(t)
        key, rows = locator.locate(weight)
        if key not in tuned:
            raise UserError(msg("{path}: has no tensor '{key}'; is it a checkpoint of the same family as the base?", path=tuned_path, key=key))
        other = tuned[key] if rows is None else tuned[key][rows]
        if other.shape != weight.shape:
            raise UserError(msg("{path}: '{key}' has shape {shape}, the base {base}; is it a checkpoint of the same family as the base?",
                                path=tuned_path, key=key, shape=tuple(other.shape), base=tuple(weight.shape)))
        yield t, other.float() - weight.detach().float()


def _part(target):
    from lora_train.network.fused import part_weight

    return part_weight(target.module, target.part)


def extract(base: str | os.PathLike, tuned: str | os.PathLike, rank: int, output: str | os.PathLike, conv_rank: int | None = None,
            clamp_quantile: float = 0.99, min_diff: float = 0.01, save_precision: str | None = None, adapter=None) -> ExtractResult:
    """Write the LoRA of `tuned` - `base` to `output`. `adapter`: the base already loaded (tests)."""
    from lora_train.model.header import family_of_file
    from lora_train.model.registry import load_adapter

    base, tuned = Path(base), Path(tuned)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise UserError(msg("--rank and --conv-rank must be at least 1"))
    if not 0 < clamp_quantile <= 1:
        raise UserError(msg("--clamp-quantile {value}: must be above 0 and at most 1", value=clamp_quantile))
    dtype = lowrank.save_dtype(save_precision)
    out = check_output(output, [base, tuned])
    families = family_of_file(base), family_of_file(tuned)
    if families[0] != families[1]:
        raise UserError(msg("{base} is {a} and {tuned} is {b}: extract needs two checkpoints of the same family", base=base.name,
                            a=families[0], tuned=tuned.name, b=families[1]))
    adapter = adapter or load_adapter(str(base))
    tuned_state, _ = read_checkpoint(tuned)
    diffs = list(_differences(adapter, tuned_state, tuned, conv_rank is not None))
    del tuned_state
    result = ExtractResult(out)
    te = [d for t, d in diffs if not t.name.startswith("lora_unet_")]
    result.largest_te_diff = max((float(d.abs().max()) for d in te), default=0.0)
    if result.largest_te_diff <= min_diff:
        result.text_encoder = False
        diffs = [(t, d) for t, d in diffs if t.name.startswith("lora_unet_")]
        result.notes.append(msg("the text encoders are the same (largest difference {diff} <= min_diff {min}): UNet only",
                                diff=f"{result.largest_te_diff:.3g}", min=min_diff))
    tensors: dict[str, torch.Tensor] = {}
    for t, diff in diffs:
        r = conv_rank if t.is_conv3x3 else rank
        out_dim, in_dim = diff.shape[:2]
        f = clamped(lowrank.factorize(diff.reshape(out_dim, -1), min(r, in_dim, out_dim)), clamp_quantile)
        down, up = lowrank.kohya_shapes(f, diff.shape)
        tensors[f"{t.name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{t.name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{t.name}.alpha"] = torch.tensor(float(f.rank)).to(dtype)
    result.modules = len(diffs)
    save_lora(out, tensors, _metadata(adapter.info, rank, conv_rank, out))
    write_card(out, adapter.info.family, msg("extracted from {tuned} - {base} at rank {rank}{conv}", tuned=tuned.name, base=base.name,
                                                 rank=rank, conv=f", conv {conv_rank}" if conv_rank else ""))
    return result


def _metadata(info, rank: int, conv_rank: int | None, out: Path) -> dict[str, str]:
    """sd-scripts' minimum (what loaders and config-from-lora read) and the modelspec it adds."""
    args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    return {
        "ss_v2": str(info.family == "sd2"),
        "ss_base_model_version": info.base_model_version,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(args),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": info.modelspec_architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if info.family == "sdxl" else "diffusers",
        "modelspec.title": out.stem,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.prediction_type": info.prediction_type,
        "modelspec.date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
