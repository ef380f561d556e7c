"""sd-scripts' fine-tuning metadata: captions, tags and sizes per image, in one file.

`merge_captions_to_metadata.py`, `merge_dd_tags_to_metadata.py` and `prepare_buckets_latents.py` write a
JSON object `{image_key: {"caption": ..., "tags": ..., "train_resolution": [w, h]}}`; newer sd-scripts
also reads JSON lines `{"image_path": ..., "caption": ..., "tags": ..., "image_size": [w, h]}` (`.jsonl`).

- An image key is a path (absolute, or relative to the image folder) or, as those scripts write it
  without `--full_path`, a file name without its extension, looked up in the image folder.
- The caption is the entry's caption, then caption_separator, then its tags (either may be missing);
  with enable_wildcard the tags follow every caption line, as in sd-scripts.
- The size given (image_size, else train_resolution) is the size sd-scripts picks the bucket by, so it
  is used the same way. sd-scripts' `.npz` latents are not read: LoRA Train encodes and caches its own.

Nothing here raises on bad content: each problem is (file, reason) naming the entry's key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_train.dataset.images import IMAGE_EXTENSIONS
from lora_train.errors import msg

Found = list[tuple[Path, str]]


@dataclass
class Entry:
    key: str
    path: Path
    caption: str
    size: tuple[int, int] | None  # what sd-scripts buckets the image by; None: the image's own size


def read_metadata(file: Path, image_dir: Path | None, separator: str, wildcard: bool) -> tuple[list[Entry], Found, Found]:
    """(entries whose image exists, problems, notes)."""
    problems: Found = []
    notes: Found = []
    raw = _load(file, problems)
    entries = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            problems.append((file, msg("'{key}': the entry is not a JSON object with caption and tags; the image is not used", key=key)))
            continue
        path = _find_image(key, image_dir)
        if path is None:
            where = image_dir if image_dir is not None and not Path(key).is_absolute() else Path(key).parent
            problems.append((file, msg("'{key}': no such image in {folder}", key=key, folder=where)))
            continue
        caption = _caption(file, key, value, separator, wildcard, problems)
        entries.append(Entry(key, path, caption, _size(file, key, value, problems)))
    folders = {e.path.parent for e in entries} | ({image_dir} if image_dir is not None and image_dir.is_dir() else set())
    cached = sorted(f for f in folders if any(f.glob("*.npz")))
    if cached:
        notes.append((cached[0], msg("sd-scripts' .npz latents are not read: LoRA Train encodes the images and caches its own latents "
                                     "(cache_latents)")))
    return entries, problems, notes


def _load(file: Path, problems: Found) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problems.append((file, msg("metadata file does not exist")))
        return {}
    except (OSError, UnicodeDecodeError) as e:
        problems.append((file, msg("cannot read the metadata file ({error})", error=e)))
        return {}
    if file.suffix.lower() == ".jsonl":
        return _jsonl(file, text, problems)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append((file, msg("not valid JSON (line {line}, column {column}: {error})", line=e.lineno, column=e.colno, error=e.msg)))
        return {}
    if not isinstance(data, dict):
        problems.append((file, msg("the metadata must be a JSON object with one entry per image")))
        return {}
    if not data:
        problems.append((file, msg("the metadata has no image entries")))
    return data


def _jsonl(file: Path, text: str, problems: Found) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((file, msg("line {line}: not valid JSON ({error})", line=n, error=e.msg)))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
            problems.append((file, msg("line {line}: no image_path; the line is not used", line=n)))
            continue
        out[row["image_path"]] = {k: row[k] for k in ("caption", "tags", "image_size") if k in row}
    return out


def _find_image(key: str, image_dir: Path | None) -> Path | None:
    given = Path(key)
    if not given.is_absolute():
        if image_dir is None:
            return None
        given = image_dir / given
    if given.suffix.lower() in IMAGE_EXTENSIONS and given.is_file():
        return given
    for ext in IMAGE_EXTENSIONS:
        for candidate in (given.with_name(given.name + ext), given.with_name(given.name + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def _text(file: Path, key: str, value: Any, what: str, separator: str, problems: Found) -> str:
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return separator.join(value)
    if not isinstance(value, str):
        problems.append((file, msg("'{key}': {what} is not text; it is left out", key=key, what=what)))
        return ""
    return value.strip()


def _caption(file: Path, key: str, entry: dict, separator: str, wildcard: bool, problems: Found) -> str:
    caption = _text(file, key, entry.get("caption"), "caption", separator, problems)
    tags = _text(file, key, entry.get("tags"), "tags", separator, problems)
    lines = [line.strip() for line in caption.splitlines() if line.strip()]
    if wildcard:
        tags = separator.join(line.strip() for line in tags.splitlines() if line.strip())
        if tags:
            lines = [f"{line}{separator}{tags}" for line in lines] or [tags]
        text = "\n".join(lines)
    else:
        text = " ".join(lines)
        if tags:
            text = f"{text}{separator}{tags}" if text else tags
    if not text:
        problems.append((file, msg("'{key}': no caption or tags; the image trains with an empty caption, as in sd-scripts", key=key)))
    return text


def _size(file: Path, key: str, entry: dict, problems: Found) -> tuple[int, int] | None:
    for name in ("image_size", "train_resolution"):
        value = entry.get(name)
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            return int(value[0]), int(value[1])
        problems.append((file, msg("'{key}': {name} must be [width, height]; the image's own size is used", key=key, name=name)))
        return None
    return None
