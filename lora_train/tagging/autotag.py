"""Taggers as the store uses them: a function from a batch of images to a tag list per image.

Loaded models are kept (one of each kind) so tagging page after page does not reload them; a
download is refused where the access policy refuses it, before anything is fetched.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from lora_train.access import AccessPolicy
from lora_train.errors import UserError, msg

TagImages = Callable[[list], list[list[str]]]
_loaded: dict[str, tuple[str, object]] = {}
_lock = threading.Lock()


def _cached(kind: str, key: str, make):
    with _lock:
        held = _loaded.get(kind)
        if held is None or held[0] != key:
            _loaded.pop(kind, None)  # one model of each kind in memory
            _loaded[kind] = (key, make())
        return _loaded[kind][1]


def unload() -> None:
    with _lock:
        _loaded.clear()


def _local_or_name(name: str, access: AccessPolicy) -> str:
    """A folder is checked like any folder the tab opens; anything else is a model name (a repo id
    such as "Salesforce/blip-image-captioning-large" looks like a relative path, hence the order)."""
    path = Path(name).expanduser()
    if path.is_dir() or path.is_absolute() or name.startswith((".", "~")):
        return str(access.folder(name))
    return name


def wd14_tagger(name: str, models_dir: Path, access: AccessPolicy | None = None, *, general: float | None = None,
                character: float | None = None, undesired: str | list[str] = "", rating: bool = False,
                escape: bool = False, batch_size: int = 4) -> TagImages:
    from lora_train.tagging import wd14
    from lora_train.tagging.ops import split_tags

    access = access or AccessPolicy()
    name = (name or "").strip()
    if not name:
        raise UserError(msg("choose a tagger model"))
    spec = _local_or_name(name, access)
    if spec in wd14.MODELS and not (Path(models_dir) / spec / "model.onnx").is_file():
        access.check_changes_files(msg("downloading the tagger {name}", name=spec))
    folder = wd14.resolve_model(spec, Path(models_dir), allow_download=not access.restricted)
    tagger = _cached("wd14", str(folder), lambda: wd14.WD14Tagger(folder, batch_size=batch_size))
    options = wd14.TagOptions(
        general_threshold=general, character_threshold=character, include_rating=rating,
        undesired=tuple(split_tags(undesired) if isinstance(undesired, str) else undesired), escape_brackets=escape)

    def tag_images(images: list) -> list[list[str]]:
        return [[tag for tag, _ in found] for found in tagger.tag(images, options)]

    tag_images.warning = getattr(tagger, "warning", None)
    return tag_images


def blip_tagger(name: str | None, models_dir: Path, access: AccessPolicy | None = None, *, num_beams: int = 3,
                min_length: int = 5, max_length: int = 75) -> TagImages:
    """A BLIP caption, as one "tag" (a sentence holds no commas worth splitting on)."""
    from lora_train.tagging import blip

    access = access or AccessPolicy()
    name = (name or "").strip() or blip.DEFAULT_MODEL
    spec = _local_or_name(name, access)
    resolved = blip.resolve_model(spec, Path(models_dir), allow_download=not access.restricted)
    captioner = _cached("blip", str(resolved), lambda: blip.BlipCaptioner(resolved))

    def tag_images(images: list) -> list[list[str]]:
        return [[c.replace(",", " ").strip()] if c.strip() else [] for c in
                captioner.caption(images, num_beams=num_beams, min_length=min_length, max_length=max_length)]

    return tag_images
