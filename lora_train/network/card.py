"""The LoRA card: a published `.safetensors` in the WebUI's LoRA folder with the sidecar `<name>.json`
(the user metadata the WebUI's card editor writes) and `<name>.preview.png`.

Files are copied into the folder, never trained there: the WebUI's Lora list walks the folder and
would list any `.pt` a run writes there as a network. Each name is used once, because the WebUI caches merged
weights per name and would keep showing an overwritten file's old weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lora_train.network.files import atomic_write_bytes

_UNSAFE = re.compile(r"[^\w\-. ]+", re.UNICODE)


@dataclass
class Card:
    activation_text: str = ""  # the trigger word(s): inserted after <lora:name:w> when the card is clicked
    sd_version: str = "SD1"  # "SD1" | "SD2" | "SDXL", as the WebUI's editor spells it
    preferred_weight: float = 1.0
    notes: str = ""
    description: str = ""
    negative_text: str = ""

    def to_json(self) -> dict:
        return {
            "description": self.description,
            "sd version": self.sd_version,
            "activation text": self.activation_text,
            "preferred weight": self.preferred_weight,
            "negative text": self.negative_text,
            "notes": self.notes,
        }


SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def safe_name(name: str) -> str:
    """A file stem that is safe in any folder: no separators, no `..`, not empty."""
    stem = _UNSAFE.sub("_", name.strip()).strip(". ")
    return stem or "lora"


def unique_name(folder: Path, name: str, taken: set[str] | None = None) -> str:
    """`name`, or `name_2`, `name_3` ... so that no file of that stem (nor `name-*`) exists yet."""
    base = safe_name(name)
    taken = taken or set()

    def used(stem: str) -> bool:
        return stem in taken or any(folder.glob(f"{glob_escape(stem)}.*")) or any(folder.glob(f"{glob_escape(stem)}-*.safetensors"))

    candidate, n = base, 1
    while used(candidate):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def free_stem(folder: Path, stem: str) -> str:
    """`stem`, or `stem_2` ... whose `.safetensors` does not exist in `folder` yet."""
    candidate, n = stem, 1
    while (folder / f"{candidate}.safetensors").exists():
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def publish(src: Path, folder: Path, stem: str, card: Card) -> Path:
    """Copy a saved LoRA into `folder` as `<stem>.safetensors` (atomically) with its `.json` card."""
    dst = folder / f"{stem}.safetensors"
    atomic_write_bytes(dst, Path(src).read_bytes())
    atomic_write_bytes(folder / f"{stem}.json", json.dumps(card.to_json(), indent=4, ensure_ascii=False).encode("utf-8"))
    return dst


def unpublish(lora: Path) -> list[Path]:
    """Remove a published LoRA with its card and preview; the paths removed."""
    lora = Path(lora)
    gone = []
    for path in (lora, lora.with_suffix(".json"), lora.with_name(lora.stem + ".preview.png")):
        if path.is_file():
            path.unlink()
            gone.append(path)
    return gone


def set_preview(lora: Path, image_path: Path) -> Path:
    """`<stem>.preview.png` beside the LoRA (the card's image in the WebUI): a copy of a PNG sample."""
    dst = lora.with_name(lora.stem + ".preview.png")
    atomic_write_bytes(dst, Path(image_path).read_bytes())
    return dst
