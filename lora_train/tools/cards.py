"""The card beside a LoRA a tool wrote: the WebUI's `<name>.json`, whose notes say what the file was
made from. A card beside the source LoRA is carried over (activation text, weight ...), its notes kept
under the new line."""

from __future__ import annotations

import json
from pathlib import Path

from lora_train.network.card import SD_VERSION, Card
from lora_train.network.files import atomic_write_bytes


def write_card(lora: Path, family: str | None, note: str, source: Path | None = None) -> Path:
    card = Card(sd_version=SD_VERSION.get(family or "", "SD1"), notes=note)
    fields = _read_card(Path(source)) if source is not None else {}
    if fields:
        card.activation_text = str(fields.get("activation text", ""))
        card.negative_text = str(fields.get("negative text", ""))
        card.description = str(fields.get("description", ""))
        card.sd_version = str(fields.get("sd version", card.sd_version)) if family is None else card.sd_version
        try:
            card.preferred_weight = float(fields.get("preferred weight", 1.0))
        except (TypeError, ValueError):
            pass
        # pick's "suggested epoch" line is about the source's own run, not about what a tool made of it
        from lora_train.tools.pick import is_card_note

        previous = "\n".join(x for x in str(fields.get("notes", "")).splitlines() if not is_card_note(x)).strip()
        card.notes = note + ("\n" + previous if previous else "")
    path = Path(lora).with_suffix(".json")
    atomic_write_bytes(path, json.dumps(card.to_json(), indent=4, ensure_ascii=False).encode("utf-8"))
    return path


def set_note(lora: Path, line: str | None, replaces=lambda old: False) -> bool:
    """Add `line` to the notes of the card beside a published LoRA, after the notes it has; a line
    `replaces` says is outdated goes. Every other field (activation text, weight, what the WebUI's editor
    wrote) stays as it is. A file without a card gets one. Returns whether the card changed."""
    path = Path(lora).with_suffix(".json")
    if not path.is_file() and not line:
        return False
    fields = _read_card(path) or Card().to_json()
    old = str(fields.get("notes") or "")
    lines = [x for x in old.splitlines() if not replaces(x)]
    if line:
        lines.append(line)
    notes = "\n".join(lines).strip("\n")
    if notes == old and fields.get("notes") is not None:
        return False
    fields["notes"] = notes
    atomic_write_bytes(path, json.dumps(fields, indent=4, ensure_ascii=False).encode("utf-8"))
    return True


def _read_card(lora: Path) -> dict:
    """The fields of the card beside `lora` (or of the card path itself); {} when there is none or it is not a JSON object."""
    path = Path(lora).with_suffix(".json")
    try:
        fields = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return fields if isinstance(fields, dict) else {}
