"""A LoRA file as the change it makes to each weight: {kohya module name: delta shaped like the
target's weight}, at multiplier 1, for every algorithm LoRA Train loads.

The module classes compute the deltas (`LoRANetwork.from_state_dict` builds each module from the
file's keys, `delta()` gives its change), built over targets:
- a model's own modules when one is given (`--model`; a fused OpenCLIP attention's q/k/v/out part
  is a target of its own, and the module's delta is that part's slice);
- without one, stand-ins on the meta device: LoRA, LoCon and Full modules are shaped by their own
  tensors (so a file of any model size reads), the rest by the module of the same name in a
  full-size model of the file's family (`model/reference.py`).
An algorithm whose change depends on the base weight (IA3, OFT, GLoRA's W·a·b part, DoRA's
magnitude) cannot be read without the model: that is one line saying so.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lora_train.errors import UserError, msg
from lora_train.network import algorithms
from lora_train.network.files import load_lora
from lora_train.network.glora import GLoRA
from lora_train.network.ia3 import IA3
from lora_train.network.lora import LoRA
from lora_train.network.oft import BOFT, DiagOFT
from lora_train.network.targets import Target

# algorithms whose delta reads the target's weight
NEEDS_BASE = (IA3, GLoRA, DiagOFT, BOFT)


def family_of(tensors: dict, metadata: dict[str, str]) -> str:
    """sd15, sd21 or sdxl: from ss_base_model_version (or ss_v2), else from the key names."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd21"
    if version.startswith("sd_v1"):
        return "sd15"
    from lora_train.network.blocks import SDXL, layout_of

    return "sdxl" if layout_of(algorithms.split_key(k)[0] for k in tensors) is SDXL else "sd15"


@lru_cache(maxsize=3)
def _reference(arch: str) -> dict[str, Target]:
    from lora_train.model.arch import meta_unet
    from lora_train.model.reference import reference_targets
    from lora_train.network.norm import ldm_unet_norm_targets, sdxl_unet_norm_targets

    norms = (sdxl_unet_norm_targets if arch == "sdxl" else ldm_unet_norm_targets)(meta_unet(arch))
    return {t.name: t for t in reference_targets(arch, conv=True) + norms}


def _own_shape(name: str, weights: dict[str, torch.Tensor]) -> nn.Module | None:
    """A meta-device Linear/Conv2d shaped by a LoRA/LoCon/Full module's own tensors, or None for
    algorithms whose tensors do not tell the target's shape."""
    with torch.device("meta"):
        if "lora_down.weight" in weights and "lora_up.weight" in weights:
            down, up = weights["lora_down.weight"], weights["lora_up.weight"]
            if down.dim() == 4:
                return nn.Conv2d(down.shape[1], up.shape[0], tuple(down.shape[2:]), bias=False)
            return nn.Linear(down.shape[1], up.shape[0], bias=False)
        if "diff" in weights:
            diff = weights["diff"]
            bias = "diff_b" in weights
            if diff.dim() == 4:
                return nn.Conv2d(diff.shape[1], diff.shape[0], tuple(diff.shape[2:]), bias=bias)
            if diff.dim() == 2:
                return nn.Linear(diff.shape[1], diff.shape[0], bias=bias)
    return None


def standin_targets(tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: str) -> list[Target]:
    """Targets on the meta device for a file's modules, without a model."""
    try:
        algorithms.check_keys(tensors)
    except algorithms.UnsupportedKeyError as e:
        raise UserError(msg("{path}: {reason}", path=label, reason=e)) from e
    arch = family_of(tensors, metadata)
    targets = []
    for name, suffixes in algorithms.group(tensors).items():
        weights = {s: tensors[f"{name}.{s}"] for s in suffixes}
        if "dora_scale" in weights or any(algorithms.owner(s) in NEEDS_BASE for s in suffixes):
            kind = "DoRA" if "dora_scale" in weights else next(algorithms.owner(s) for s in suffixes if algorithms.owner(s) in NEEDS_BASE).algorithm
            raise UserError(msg("{path}: {name} is {algorithm}, whose change depends on the base model's weights: give --model",
                                path=label, name=name, algorithm=kind))
        module = _own_shape(name, weights)
        if module is None:
            ref = _reference(arch).get(name)
            if ref is None:
                raise UserError(msg("{path}: {name} is not a module of {arch}: give --model", path=label, name=name, arch=arch))
            module = ref.module
        targets.append(Target(name, module, name))
    return targets


def network_of(tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: str, targets: list[Target] | None = None):
    """The file's modules, built over `targets` (a model's) or stand-ins."""
    from lora_train.network.network import LoRANetwork

    if targets is None:
        targets = standin_targets(tensors, metadata, label)
    try:
        net = LoRANetwork.from_state_dict(tensors, targets)
    except KeyError as e:  # NoFitError / UnsupportedKeyError
        raise UserError(msg("'{path}' does not fit this model: {reason}", path=label, reason=e.args[0] if e.args else e)) from e
    net.set_multiplier(1.0)
    return net


@torch.no_grad()
def deltas_of(tensors: dict[str, torch.Tensor], metadata: dict[str, str], label: str,
              targets: list[Target] | None = None) -> dict[str, torch.Tensor]:
    net = network_of(tensors, metadata, label, targets)
    return {name: module.delta().detach().float() for name, module in net.lora_modules.items()}


def read_deltas(path: str | Path, targets: list[Target] | None = None) -> dict[str, torch.Tensor]:
    """{kohya module name: weight delta} of a LoRA file at multiplier 1."""
    tensors, metadata = load_lora(path)
    return deltas_of({k: v.float() for k, v in tensors.items()}, metadata, str(path), targets)


def is_plain_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Only LoRA/LoCon modules (down, up, alpha), no DoRA: the kind an exact merge concatenates."""
    return all(algorithms.owner(s) is LoRA and s != "dora_scale" for name, suffixes in algorithms.group(tensors).items() for s in suffixes)

