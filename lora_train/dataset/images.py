"""Reading training images: decode, apply EXIF rotation, make RGB, resize and centre-crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageError(Exception):
    """An image that cannot be used; the message says why."""


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image ({e})") from e


def resize_center_crop(im: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height, then cut the centre (sd-scripts without buckets)."""
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    if size != im.size:
        im = im.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1]."""
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
