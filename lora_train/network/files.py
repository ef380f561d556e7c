"""Reading and writing LoRA files in the kohya `.safetensors` format.

Writes are atomic (temp file in the same folder, then rename), so a crash never leaves a
truncated file where a good one was.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
from pathlib import Path

import torch

from lora_train.errors import UserError, msg


def payload_sha256(data: bytes) -> str:
    """sha256 of a safetensors file's tensor data, header excluded.

    This is kohya/additional-networks' `sshs_model_hash` (and A1111's LoRA hash): it does not change
    when only the metadata does.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def legacy_hash(data: bytes) -> str:
    """additional-networks' old hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    import safetensors.torch

    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Add `sshs_model_hash`, `sshs_legacy_hash` and `modelspec.hash_sha256`.

    As sd-scripts does, the hashes are taken over a file holding only the `ss_*` metadata, so user
    metadata edited later does not change them.
    """
    training_only = serialize(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    digest = payload_sha256(training_only)
    out = dict(metadata)
    out["sshs_model_hash"] = digest
    out["sshs_legacy_hash"] = legacy_hash(training_only)
    out["modelspec.hash_sha256"] = "0x" + digest
    return out


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting it, so
    that happens under a lock, through a restrictive value (a file another thread creates meanwhile
    gets fewer permissions, never more)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` all at once. The file gets the mode a plain `open(path, "wb")` of a new file would
    give it (0o666 less the umask: usually 0644), not mkstemp's private 0600, so a published LoRA,
    card or image is readable by whoever may read that folder (a WebUI run by another user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            mode = 0o666 & ~current_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            else:  # Windows: only the read-only bit exists
                os.chmod(tmp, mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_lora(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, serialize(tensors, with_hashes(tensors, metadata)))
    return path


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file; a clear error when it is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(msg("'{path}' does not exist", path=path))
    if path.suffix != ".safetensors":
        raise UserError(msg("'{path}' is not a .safetensors file", path=path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(msg("'{path}' cannot be read as safetensors ({error})", path=path, error=e)) from e
    return tensors, metadata
