"""Training state for exact resume: counters, RNG states, optimizer, scheduler and LoRA weights.

A state is a folder (`<name>-state/`, like sd-scripts' `--save_state` folders) holding the tensors
in `state.safetensors`, everything else in `state-tree.json`, and a readable summary `state.json`.
No pickle: the WebUI replaces `torch.load` with a restricted unpickler that rejects the zip layout
newer torch writes, and a state file should never be able to run code anyway. It is written to a
temporary folder and renamed into place, so a crash leaves either the old state or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lora_train.errors import UserError, msg

STATE_FILE = "state.safetensors"
TREE_FILE = "state-tree.json"
LEGACY_FILE = "state.pt"  # written before 2026-11; still read


def pack(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    """A JSON-able copy of `obj` with every tensor moved into `tensors` under a path key. Tuples and
    dicts with non-string keys (optimizer states are keyed by int) are tagged so they come back as they were."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: pack(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors, f"{path}.k{i}"), pack(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a training state")


def unpack(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    return obj


def save_state(folder: Path, state: dict, summary: dict) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        tree = pack(state, tensors)
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / TREE_FILE).write_text(json.dumps(tree), encoding="utf-8")
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
    if not path.is_dir():
        path = path.parent
    if (path / LEGACY_FILE).is_file() and not (path / STATE_FILE).is_file():
        try:
            return torch.load(str(path / LEGACY_FILE), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(msg("resume: '{path}' cannot be read ({error})", path=path / LEGACY_FILE, error=e)) from e
    if not (path / STATE_FILE).is_file() or not (path / TREE_FILE).is_file():
        raise UserError(msg("resume: '{folder}' is not a state folder written with save_state (no {state} and {tree})",
                            folder=folder, state=STATE_FILE, tree=TREE_FILE))
    try:
        from safetensors.torch import load_file

        tree = json.loads((path / TREE_FILE).read_text(encoding="utf-8"))
        return unpack(tree, load_file(str(path / STATE_FILE)))
    except Exception as e:
        raise UserError(msg("resume: '{path}' cannot be read ({error})", path=path, error=f"{type(e).__name__}: {e}")) from e
