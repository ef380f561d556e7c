"""The committed tiny *pretrained* base (`builtin:tinybase`) as files: where they are, their checksums,
and installing them with a tokenizer folder (into the cache, or a WebUI's models/Stable-diffusion).

How it is built lives with the test kit (`lora_train/testing/base.py`); the model registry only
needs to find and check the files, so they sit here with it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lora_train.errors import UserError, msg
from lora_train.model import clip_files
from lora_train.model.tiny import TINY_TEXT_CONFIG

NAME = "tinybase"
ASSETS = Path(__file__).with_name("assets")
TEXT_CONFIG = dict(TINY_TEXT_CONFIG, intermediate_size=256)  # the built-in tiny text model, wider MLP


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_assets(folder: Path = ASSETS) -> None:
    sums = folder / f"{NAME}.sha256"
    if not sums.is_file():
        raise UserError(msg("{path} is missing; rebuild the base with: {command}", path=sums,
                            command=f"python -m lora_train.testing build-base --output {folder}"))
    for line in sums.read_text(encoding="utf-8").splitlines():
        digest, name = line.split()
        f = folder / name
        if not f.is_file():
            raise UserError(msg("{path} is missing (git lfs? a partial checkout?)", path=f))
        if sha256(f) != digest:
            raise UserError(msg("{path}: checksum differs from {sums}; the file is damaged or was rebuilt without updating the sums",
                                path=f, sums=sums.name))


def install_base(folder: str | os.PathLike, source: Path = ASSETS) -> Path:
    """Copy the base into `folder` (e.g. the WebUI's models/Stable-diffusion) with its yaml and
    tokenizer folder; the yaml names the folder by absolute path, which the host needs."""
    from omegaconf import OmegaConf

    verify_assets(source)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{NAME}.safetensors"
    shutil.copyfile(source / target.name, target)
    clip_dir = clip_files.write_clip_folder(folder / f"{NAME}.clip", TEXT_CONFIG)
    cfg = OmegaConf.load(source / f"{NAME}.yaml")
    cfg.model.params.cond_stage_config.params.version = str(clip_dir.resolve())
    target.with_suffix(".yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    return target


def base_checkpoint() -> Path:
    """The committed base, installed once into the cache (tokenizer folder beside it) and checked."""
    cache = clip_files.cache_dir() / NAME
    target = cache / f"{NAME}.safetensors"
    stamp = cache / f"{NAME}.sha256"
    if not (target.is_file() and stamp.is_file() and stamp.read_bytes() == (ASSETS / stamp.name).read_bytes()):
        install_base(cache)
        shutil.copyfile(ASSETS / stamp.name, stamp)
    return target
