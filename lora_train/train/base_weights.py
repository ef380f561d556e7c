"""sd-scripts' `base_weights` / `base_weights_multiplier`: LoRA files merged into the model before
training, so the new LoRA learns what is left on top of them.

Merged and restored, not hooked beside the model: the change of DoRA, OFT, IA3 and GLoRA depends on
the weight it is applied to, so only a merged weight gives the trained LoRA the model sd-scripts
trains it on; and a fused attention part takes one hook, which the trained LoRA already holds.
The host's model must come back exactly as it was: every weight (and bias) a file changes is copied
to the CPU first and copied back on every exit path, so the restore is bit-exact whatever the
rounding of the merge was.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lora_train.errors import UserError, msg
from lora_train.network import fused
from lora_train.network.network import network_from_file
from lora_train.network.targets import Target


def multipliers(paths: list, values: list) -> list[float]:
    """One multiplier per file; a file without one gets 1.0, as in sd-scripts."""
    out = []
    for i, _ in enumerate(paths):
        if i >= len(values):
            out.append(1.0)
            continue
        try:
            out.append(float(values[i]))
        except (TypeError, ValueError):
            raise UserError(msg("base_weights_multiplier: '{value}' is not a number", value=values[i])) from None
    if len(values) > len(paths):
        raise UserError(msg("base_weights_multiplier has {count} values for {files} base_weights files", count=len(values), files=len(paths)))
    return out


def check(paths: list) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise UserError(msg("base_weights: '{path}' does not exist", path=path))


@contextlib.contextmanager
def merged(paths: list, values: list, targets: Iterable[Target]):
    """The files merged into the targets' weights (in order, each at its multiplier) for the duration."""
    if not paths:
        yield
        return
    targets = list(targets)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, its CPU copy)
    try:
        for path, multiplier in zip(paths, multipliers(paths, values)):
            _merge(network_from_file(path, targets), multiplier, saved)
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved.values():
                tensor.copy_(copy)


@torch.no_grad()
def _merge(network, multiplier: float, saved: dict) -> None:
    network.set_multiplier(multiplier)
    network.eval()  # no dropout
    for module in network.lora_modules.values():
        weight = module.org_weight()
        module.to(device=weight.device, dtype=torch.float32)
        changes = [(weight, module.delta())]
        if hasattr(module, "bias_delta"):  # full (diff_b) and norm modules change the bias too
            bias = _bias(module)
            change = module.bias_delta()
            if bias is None and bool(change.any()):
                raise UserError(msg("base_weights: {name} changes a bias its target does not have", name=module.lora_name))
            if bias is not None:
                changes.append((bias, change))
        for tensor, change in changes:
            # a whole parameter is saved before its first change; a fused part's view saves its parameter
            base = tensor._base if tensor._base is not None else tensor
            if id(base) not in saved:
                saved[id(base)] = (base, base.detach().to("cpu", copy=True))
            tensor.add_(change.to(device=tensor.device, dtype=tensor.dtype))


def _bias(module) -> torch.Tensor | None:
    org: nn.Module = module.org
    if module.part is None:
        return getattr(org, "bias", None)
    if module.part == "out":
        return org.out_proj.bias
    return None if org.in_proj_bias is None else org.in_proj_bias.chunk(3)[fused.PARTS.index(module.part)]
