"""What `info` reports about a LoRA file: metadata summary, modules per prefix, network kind, and
whether every key is a valid kohya name with its down/up/alpha triple."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

from lora_train.errors import msg
from lora_train.network.files import load_lora, payload_sha256
from lora_train.network import algorithms

SUMMARY_KEYS = (
    "ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images", "ss_epoch", "ss_steps",
    "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_training_started_at", "ss_training_finished_at",
    "sshs_model_hash", "modelspec.architecture",
)

KEY_FORMAT = "<lora_unet|lora_te|lora_te1|lora_te2>_<module>.<key>"
MODULE_KEY_RE = re.compile(r"^(lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(.+)$")


@lru_cache(maxsize=4)
def _known_targets(arch: str) -> dict[str, bool]:
    """The module names sd-scripts and LyCORIS train on `arch` (norm layers included), and whether each is a conv larger than 1x1."""
    from lora_train.model.arch import meta_unet
    from lora_train.model.reference import reference_targets
    from lora_train.network.norm import ldm_unet_norm_targets, sdxl_unet_norm_targets

    norms = (sdxl_unet_norm_targets if arch == "sdxl" else ldm_unet_norm_targets)(meta_unet(arch))  # LyCORIS' train_norm
    return {t.name: t.is_conv3x3 for t in reference_targets(arch, conv=True) + norms}


def _algorithm_of(name: str, parts: dict[str, list[int]]):
    """(the algorithm whose keys a module has, or None; a problem line, or None)."""
    suffixes = set(parts)
    own = suffixes - set(algorithms.SHARED_SUFFIXES)
    shapes = {k: torch.empty(v, device="meta") for k, v in parts.items()}  # Diag-OFT and BOFT differ in shape only
    for cls in algorithms.ALGORITHMS:
        if cls.claims(own) and not own - set(cls.suffixes) and (not hasattr(cls, "fits") or cls.fits(shapes)):
            return cls, None
    stray = sorted(s for s in suffixes if algorithms.what_owns(f"{name}.{s}") is not None)
    if stray:
        return None, msg("{what}: {reason}", what=f"{name}.{stray[0]}", reason=algorithms.unsupported(f"{name}.{stray[0]}", algorithms.what_owns(f"{name}.{stray[0]}")))
    partial = next((cls for cls in algorithms.ALGORITHMS if own & set(cls.suffixes)), None)
    if partial is not None:
        missing = [s for s in partial.suffixes if s not in partial.optional and s not in own]
        if missing:
            return None, msg("{name}: {part} is missing", name=name, part=" and ".join(missing))
        return None, msg("{name}: keys of more than one algorithm ({keys})", name=name, keys=", ".join(sorted(own)))
    return None, msg("{name}: no known network keys", name=name)


def _ranks(algorithm, parts: dict[str, list[int]]) -> set[int]:
    """The module's rank where its algorithm has one (LoRA's down, LoHa's and LoKr's inner dimension)."""
    for key in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b", "a1.weight"):
        if key in parts:
            return {parts[key][0]}
    return set()


def _arch_of(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return "sdxl"
    if version.startswith("sd_v1"):
        return "sd15"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd21"
    return None


def inspect_lora(path: str | Path) -> dict:
    tensors, metadata = load_lora(path)
    modules: dict[str, dict[str, list[int]]] = {}
    problems: list[str] = []
    for key, value in tensors.items():
        m = MODULE_KEY_RE.match(key)
        if not m:
            problems.append(msg("{key}: not a kohya LoRA key ({format})", key=key, format=KEY_FORMAT))
            continue
        modules.setdefault(m.group(1), {})[m.group(2)] = list(value.shape)
    arch = _arch_of(metadata)
    known = _known_targets(arch) if arch else None
    kinds: Counter[str] = Counter()
    conv_modules = 0
    ranks = set()
    for name, parts in sorted(modules.items()):
        algorithm, problem = _algorithm_of(name, parts)
        if problem:
            problems.append(problem)
        if algorithm is not None and "alpha" in algorithm.suffixes and "alpha" not in parts and algorithm.algo in (None, "lora", "loha", "lokr"):
            problems.append(msg("{name}: {part} is missing", name=name, part="alpha"))  # loaders default it; sd-scripts and LyCORIS always write it
        if algorithm is not None:
            kinds["DoRA/" + algorithm.algorithm if "dora_scale" in parts else algorithm.algorithm] += 1
            ranks.update(_ranks(algorithm, parts))
        if known is not None and name not in known:
            problems.append(msg("{name}: not a module sd-scripts trains on {arch}", name=name, arch=arch))
        elif known is not None and known[name]:
            conv_modules += 1
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down and up and down[0] != up[1]:
            problems.append(msg("{name}: lora_down rank {down} does not match lora_up rank {up}", name=name, down=down[0], up=up[1]))
        if known is None and down and len(down) == 4 and down[2:] != [1, 1]:
            conv_modules += 1
    if not modules:
        network_kind = "empty"
    elif set(kinds) <= {"LoRA", "LoCon"}:  # they share their keys: a 3x3 conv module makes it LoCon
        network_kind = "LoCon" if conv_modules else "LoRA"
    else:
        network_kind = "/".join(sorted(kinds))
    prefixes = Counter(name.split("_text_model")[0] if "_text_model" in name else "lora_unet" for name in modules)
    ranks = sorted(ranks)
    data = Path(path).read_bytes()
    stored_hash = metadata.get("sshs_model_hash")
    return {
        "file": str(path),
        "network": network_kind,
        "architecture": arch or "unknown",
        "modules": len(modules),
        "modules_per_prefix": dict(sorted(prefixes.items())),
        "conv_modules": conv_modules,
        "ranks": ranks,
        "tensors": len(tensors),
        "metadata_keys": len(metadata),
        "summary": {k: metadata[k] for k in SUMMARY_KEYS if k in metadata},
        "tag_frequency": json.loads(metadata["ss_tag_frequency"]) if metadata.get("ss_tag_frequency", "None") != "None" else None,
        "hash_ok": None if stored_hash is None else stored_hash == payload_sha256(data),
        "valid": not problems,
        "problems": problems,
    }
