"""Training state for exact resume: counters, RNG states, optimizer, scheduler and LoRA weights.

A state is a folder (`<name>-state/`, like sd-scripts' `--save_state` folders) holding `state.pt`
and a readable `state.json`. It is written to a temporary folder and renamed into place, so a
crash leaves either the old state or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lora_train.errors import UserError

STATE_FILE = "state.pt"


def save_state(folder: Path, state: dict, summary: dict) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_state(folder: str | os.PathLike) -> dict:
    path = Path(folder)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"resume: '{folder}' is not a state folder written with save_state (no {STATE_FILE})")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"resume: '{path}' cannot be read ({e})") from e
