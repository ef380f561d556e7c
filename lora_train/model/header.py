"""A checkpoint's model family from its tensor names alone, without loading its weights: for
`train --dry-run`, which checks a config before a run would load the model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lora_train.errors import UserError, msg

# family -> the reference architecture its targets are listed from (model/arch.py), and its training size
ARCH = {"sd1": ("sd15", 512), "sd2": ("sd21", 768), "sdxl": ("sdxl", 1024)}


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names of a .safetensors (its JSON header) or a .ckpt (memory-mapped, not read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(msg("model file '{path}' does not exist", path=path))
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as e:
            raise UserError(msg("{path}: not a readable .safetensors file ({error})", path=path, error=e)) from e
        return [k for k in header if k != "__metadata__"]
    import torch

    try:
        data = torch.load(str(path), map_location="meta", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(msg("{path}: cannot read checkpoint ({error})", path=path, error=e)) from e
    return list(data.get("state_dict", data))


def family_of_file(path: str | Path) -> str:
    """"sd1" | "sd2" | "sdxl" (a yaml beside the file that names sgm classes is SDXL too; a diffusers
    folder says it in its configs)."""
    from lora_train.model.diffusers_folder import family_of_folder, is_diffusers_folder

    if is_diffusers_folder(Path(path)):
        return family_of_folder(Path(path))
    from lora_train.model.stock import family_of_keys

    yaml = Path(path).with_suffix(".yaml")
    if yaml.is_file() and "sgm." in yaml.read_text(encoding="utf-8", errors="replace"):
        return "sdxl"
    return family_of_keys(set(tensor_names(path)))  # the keys the loader itself decides by
