"""Reading caption files next to images."""

from __future__ import annotations

from pathlib import Path

DEFAULT_EXTENSIONS = (".txt", ".caption")


def caption_path(image: Path, extension: str | None) -> Path | None:
    """The caption file for `image`: the configured extension, else .txt then .caption."""
    for ext in (extension,) if extension else DEFAULT_EXTENSIONS:
        candidate = image.with_suffix(ext if ext.startswith(".") else "." + ext)
        if candidate.is_file():
            return candidate
    return None


def read_caption(path: Path) -> str:
    data = path.read_bytes()
    encoding = "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    text = data.decode(encoding)
    # sd-scripts reads the first line only
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]
