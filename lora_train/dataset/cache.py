"""Latent cache (sd-scripts' cache_latents / cache_latents_to_disk).

We cache the VAE posterior (mean and std), not one sample of it, so cached training still draws
fresh latent noise every step. An entry is keyed by the image's bytes, the bucket, the resize and
crop, the flip, and a fingerprint of the VAE weights: change any of them and it is rebuilt. A
disk entry that cannot be read or does not match is rebuilt too, with a warning; it is never trusted
blindly.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lora_train.errors import msg

CACHE_DIR = ".lora_train_cache"  # inside the image folder; scans skip hidden folders


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha1 over every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha1(path: Path) -> str:
    return file_digest(path, "sha1")


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    image: Path
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    flip: bool
    interpolation: str | None = None  # resize_interpolation; None (the default filters) keeps older entries valid

    def digest(self, image_sha1: str, vae: str) -> str:
        text = f"v1|{image_sha1}|{self.bucket}|{self.resized}|{self.crop}|{int(self.flip)}|{vae}"
        if self.interpolation is not None:
            text += f"|{self.interpolation}"
        return hashlib.sha1(text.encode()).hexdigest()


class LatentCache:
    def __init__(self, vae_fingerprint: str, to_disk: bool = False, warn: Callable[[str], None] = print):
        self.vae = vae_fingerprint
        self.to_disk = to_disk
        self.warn = warn
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._image_sha1: dict[tuple[Path, int, int], str] = {}
        self.hits = self.misses = self.rebuilt = 0

    def _sha1(self, path: Path) -> str:
        st = path.stat()
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._image_sha1:
            self._image_sha1[key] = file_sha1(path)
        return self._image_sha1[key]

    def disk_path(self, key: CacheKey) -> Path:
        tag = "_flip" if key.flip else ""
        return key.image.parent / CACHE_DIR / f"{key.image.stem}_{key.bucket[0]}x{key.bucket[1]}{tag}.safetensors"

    def get(self, key: CacheKey, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) for `key`, from memory, disk, or `compute()` (then stored)."""
        digest = key.digest(self._sha1(key.image), self.vae)
        if digest in self._memory:
            self.hits += 1
            return self._memory[digest]
        value = self._read_disk(key, digest) if self.to_disk else None
        if value is None:
            self.misses += 1
            mean, std = compute()
            value = (mean.detach().cpu().float().contiguous(), std.detach().cpu().float().contiguous())
            if self.to_disk:
                self._write_disk(key, digest, value)
        else:
            self.hits += 1
        self._memory[digest] = value
        return value

    def _read_disk(self, key: CacheKey, digest: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.disk_path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get("key") != digest:
                    return None  # stale: the image, crop or VAE changed
                mean, std = f.get_tensor("mean"), f.get_tensor("std")
            expected = (key.bucket[1] // 8, key.bucket[0] // 8)
            if mean.shape[-2:] != expected or std.shape != mean.shape or not torch.isfinite(mean).all():
                raise ValueError(f"shape {tuple(mean.shape)} does not fit bucket {key.bucket}")
            return mean, std
        except Exception as e:  # a corrupt or foreign file: rebuild it
            self.rebuilt += 1
            self.warn(msg("warning: {warning}", warning=msg("latent cache {path} is unreadable ({error}); rebuilding it", path=path, error=e)))
            return None

    def _write_disk(self, key: CacheKey, digest: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        import safetensors.torch

        path = self.disk_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            safetensors.torch.save_file({"mean": value[0], "std": value[1]}, tmp, metadata={"key": digest, "image": key.image.name})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
