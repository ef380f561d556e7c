"""A checkpoint file as its own tensors (key names and dtypes as stored), where a loaded model's
target weight sits among them, and writing a new one without touching the input.

`bake` and `extract` load the model to find LoRA Train's targets and compute deltas, but read and
write the file's own tensors: a baked checkpoint keeps every key, dtype and untouched bit of the
original, so the WebUI loads it as it loaded the original.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from lora_train.errors import UserError, msg


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a .safetensors or .ckpt checkpoint and its safetensors metadata (empty for .ckpt)."""
    from lora_train.model.loading import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise UserError(msg("model file '{path}' does not exist", path=path))
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
        except Exception as e:
            raise UserError(msg("{path}: not a readable .safetensors file ({error})", path=path, error=e)) from e
    state = read_state_dict(path)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, metadata


class Locator:
    """Where a model's parameter (or a row block of one: a fused attention part) is in its checkpoint."""

    def __init__(self, model: nn.Module):
        self.names = {id(p): n for n, p in model.named_parameters()}

    def locate(self, tensor: torch.Tensor) -> tuple[str, slice | None]:
        """(checkpoint key, rows of it or None for the whole tensor)."""
        base = tensor._base if tensor._base is not None else tensor
        name = self.names.get(id(base))
        if name is None:
            raise UserError(msg("a LoRA target's weight is not a parameter of the loaded model"))
        if base is tensor:
            return name, None
        first = (tensor.storage_offset() - base.storage_offset()) // base.stride(0)
        return name, slice(first, first + tensor.shape[0])


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(output: str | os.PathLike, inputs: list, what: str = "--output") -> Path:
    """`output` as a .safetensors path that is none of the `inputs` (an input is never overwritten)."""
    out = Path(output)
    if out.suffix != ".safetensors":
        raise UserError(msg("{what} '{path}': the output must be a .safetensors file", what=what, path=out))
    for src in inputs:
        if same_file(out, src):
            raise UserError(msg("{what} '{path}' is an input file; inputs are never overwritten: choose another name", what=what, path=out))
    if out.is_dir():
        raise UserError(msg("{what} '{path}' is a folder", what=what, path=out))
    return out


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory, which a .ckpt's may (tied weights): copy those."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], source: Path) -> Path:
    """Write `state` to `path` through a temporary file beside it (never a half-written checkpoint),
    and copy `source`'s same-named .yaml beside it when there is one (SD2 and custom configs need it)."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        safetensors.torch.save_file(_unshared(state), str(tmp), metadata or None)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    yaml = Path(source).with_suffix(".yaml")
    if yaml.is_file() and not same_file(yaml, path.with_suffix(".yaml")):
        shutil.copyfile(yaml, path.with_suffix(".yaml"))
    return path
