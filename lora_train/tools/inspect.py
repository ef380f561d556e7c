"""What `info` reports about a LoRA file: metadata summary, modules per prefix, network kind, and
whether every key is a valid kohya name with its down/up/alpha triple."""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

from lora_train.errors import msg
from lora_train.network.files import load_lora, payload_sha256
from lora_train.network.network import KEY_RE

SUMMARY_KEYS = (
    "ss_output_name", "ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
    "ss_network_alpha", "ss_network_args", "ss_resolution", "ss_num_train_images", "ss_epoch", "ss_steps",
    "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_training_started_at", "ss_training_finished_at",
    "sshs_model_hash", "modelspec.architecture",
)

KEY_FORMAT = "<lora_unet|lora_te|lora_te1|lora_te2>_<module>.<lora_down.weight|lora_up.weight|alpha>"
LYCORIS_SUFFIXES = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "oft_blocks": "OFT", "diff": "full", "dora_scale": "DoRA"}


@lru_cache(maxsize=4)
def _known_names(arch: str) -> frozenset[str]:
    from lora_train.model.reference import reference_targets

    return frozenset(t.name for t in reference_targets(arch, conv=True))


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
    kinds: Counter[str] = Counter()
    for key, value in tensors.items():
        m = KEY_RE.match(key)
        if not m:
            name, _, part = key.partition(".")
            kind = LYCORIS_SUFFIXES.get(part.rsplit(".", 1)[0])
            if kind:
                kinds[kind] += 1
            problems.append(msg("{key}: not a kohya LoRA key ({format})", key=key, format=KEY_FORMAT))
            continue
        modules.setdefault(m.group(1), {})[m.group(2)] = list(value.shape)
    arch = _arch_of(metadata)
    known = _known_names(arch) if arch else None
    conv_modules = 0
    for name, parts in sorted(modules.items()):
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            if part not in parts:
                problems.append(msg("{name}: {part} is missing", name=name, part=part))
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down and up and down[0] != up[1]:
            problems.append(msg("{name}: lora_down rank {down} does not match lora_up rank {up}", name=name, down=down[0], up=up[1]))
        if down and len(down) == 4 and down[2:] != [1, 1]:
            conv_modules += 1
        if known is not None and name not in known:
            problems.append(msg("{name}: not a module sd-scripts trains on {arch}", name=name, arch=arch))
    prefixes = Counter(name.split("_text_model")[0] if "_text_model" in name else "lora_unet" for name in modules)
    if kinds:
        network_kind = "/".join(sorted(kinds))
    elif not modules:
        network_kind = "empty"
    else:
        network_kind = "LoCon" if conv_modules else "LoRA"
    ranks = sorted({p["lora_down.weight"][0] for p in modules.values() if "lora_down.weight" in p})
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
