"""`bake`: LoRA files merged into a checkpoint, written as a new checkpoint.

Each LoRA is loaded as a network over the model's targets (any algorithm LoRA Train loads), and
each module's `delta()` at its weight W is added to its target's weight in the file's own tensors
(a fused attention part: its rows of `in_proj_weight`; full and norm modules change the bias too).
Every delta is taken against the original weights, as when all the LoRAs are hooked on the model
at once, so the baked checkpoint's forward is the hooked one's. Keys, dtypes and every untouched
tensor stay as the input has them; the input is never written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_train.errors import UserError, msg
from lora_train.network.full import target_bias
from lora_train.tools.checkpoint import Locator, check_output, read_checkpoint, write_checkpoint


@dataclass
class BakeResult:
    path: Path
    modules: int = 0  # module deltas added, over all LoRAs
    tensors: int = 0  # checkpoint tensors changed
    notes: list[str] = field(default_factory=list)


def parse_lora_weight(text: str) -> tuple[str, float]:
    """`FILE[:W]`: a weight after the last colon when it is a number (a Windows drive's colon is not one)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def changes_of(network, locator: Locator) -> dict[tuple[str, slice | None], torch.Tensor]:
    """The change each module of `network` (multiplier set) makes, by (checkpoint key, rows)."""
    out: dict[tuple[str, slice | None], torch.Tensor] = {}
    network.eval()  # no dropout
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.float()
            found = [(module.org_weight(), module.delta())]
            if hasattr(module, "bias_delta"):  # full (diff_b) and norm modules change the bias too
                bias, change = target_bias(module.org, module.part), module.bias_delta()
                if change is not None and bias is None and bool(change.any()):
                    raise UserError(msg("{name} changes a bias its target does not have", name=module.lora_name))
                if change is not None and bias is not None:
                    found.append((bias, change))
            for tensor, change in found:
                key, rows = locator.locate(tensor)
                slot = (key, None if rows is None else (rows.start, rows.stop))
                out[slot] = out.get(slot, 0) + change.detach().float().cpu().reshape(tensor.shape)
    return out


def bake(checkpoint: str | os.PathLike, loras: list[tuple[str, float]], output: str | os.PathLike, adapter=None) -> BakeResult:
    """Write `output`: `checkpoint` with each (LoRA file, weight) merged in. `adapter`: the checkpoint
    already loaded (tests); by default it is loaded here."""
    from lora_train.model.registry import load_adapter
    from lora_train.network.network import network_from_file

    checkpoint = Path(checkpoint)
    if not loras:
        raise UserError(msg("bake: name at least one LoRA file (FILE or FILE:WEIGHT)"))
    out = check_output(output, [checkpoint, *(p for p, _ in loras)])
    for path, _ in loras:
        if not Path(path).is_file():
            raise UserError(msg("'{path}' does not exist", path=path))
    state, metadata = read_checkpoint(checkpoint)
    adapter = adapter or load_adapter(str(checkpoint))
    locator = Locator(adapter.model)
    targets = adapter.file_targets()
    total: dict = {}
    result = BakeResult(out)
    for path, weight in loras:
        network = network_from_file(path, targets)
        network.set_multiplier(float(weight))
        result.modules += len(network.lora_modules)
        for slot, change in changes_of(network, locator).items():
            total[slot] = total.get(slot, 0) + change
    for (key, rows), change in total.items():
        if key not in state:
            raise UserError(msg("{path}: has no tensor '{key}' for a LoRA target (a checkpoint the loader converted?)", path=checkpoint, key=key))
        merged = state[key].float().clone()
        part = merged if rows is None else merged[rows[0]:rows[1]]
        if part.shape != change.shape:
            raise UserError(msg("{path}: '{key}' has shape {shape}, the LoRA's change {change}", path=checkpoint, key=key,
                                shape=tuple(part.shape), change=tuple(change.shape)))
        part += change
        state[key] = merged.to(state[key].dtype)
    result.tensors = len({key for key, _ in total})
    write_checkpoint(out, state, metadata, checkpoint)
    return result
