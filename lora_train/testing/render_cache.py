"""The base's own renders, kept on disk between fidelity runs.

The regularization images and the base's scores on the trigger and collateral prompts are renders of
the base alone: the positive run and every negative control with the same options make the same ones,
and at the default options they are a good part of a run's time. A render is looked up by everything
that decides its pixels: the checkpoint (sha256 of its files), the prompts, seed, steps, CFG scale, and
the code that draws and samples (its source's sha256 and torch's version), so an edit to the sampler
or a rebuilt base is a miss, never a stale hit. Images are stored as PNG, which is lossless: a hit
returns the very pixels a fresh render gives, so a run's results do not depend on the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

# What the pixels of a base render depend on besides the checkpoint and the arguments
_CODE = ("lora_train/sample", "lora_train/testing/scenes.py", "lora_train/model")


def code_digest() -> str:
    import torch

    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256(torch.__version__.encode())
    for part in _CODE:
        path = root / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def model_digest(model: str) -> str:
    """sha256 of a checkpoint file and its config yaml; a built-in name (`builtin:tiny`, made from a
    seed by our code) stands for itself."""
    from lora_train.model.tinybase import sha256

    path = Path(model)
    if not path.is_file():
        return model
    yaml = path.with_suffix(".yaml")
    return sha256(path) + (sha256(yaml) if yaml.is_file() else "")


def cached(render, folder: Path, model: str):
    """`render(adapter, prompts, opts, scale=None)` (fidelity._render on the base) with its images kept in
    `folder`. Only for renders of the base alone: the key does not see a LoRA applied to the adapter."""
    folder = Path(folder)
    base = json.dumps([model_digest(model), code_digest()])

    def cached_render(adapter, prompts: list[str], opts, scale: float | None = None) -> list:
        scale = opts.scale if scale is None else scale
        what = json.dumps([base, list(prompts), opts.seed, opts.sample_steps, scale])
        entry = folder / hashlib.sha256(what.encode()).hexdigest()[:32]
        if (entry / "done").is_file():
            return _load(entry, len(prompts))
        images = render(adapter, prompts, opts, scale=scale)
        _store(entry, images)
        return images

    return cached_render


def _load(entry: Path, n: int) -> list:
    from PIL import Image

    out = []
    for i in range(n):
        with Image.open(entry / f"{i:04d}.png") as im:
            out.append(im.convert("RGB"))
    return out


def _store(entry: Path, images: list) -> None:
    """Written into a temporary folder and renamed, so a run stopped half-way (or a second worker
    writing the same entry) never leaves a partial entry that looks done."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    for i, im in enumerate(images):
        im.save(tmp / f"{i:04d}.png")
    (tmp / "done").write_text("", encoding="utf-8")
    try:
        os.replace(tmp, entry)
    except OSError:  # another run stored it first: theirs is the same pixels
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
