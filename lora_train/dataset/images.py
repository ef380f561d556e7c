"""Reading training images.

`probe` looks at headers only (size after EXIF rotation, format, frames, truncation markers), so a
scan of thousands of files stays fast; `load_rgb` decodes for training: first frame, EXIF rotation,
any mode to RGB with alpha composited on white (or returned as a mask).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lora_train.errors import UserError, msg

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

# Decompression-bomb guard: a 16k x 16k image is already far beyond any training resolution.
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = None  # we check sizes ourselves and report them instead of raising mid-scan

_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height

# sd-scripts' resize_interpolation names -> Pillow filters. sd-scripts runs nearest, bilinear, bicubic
# and area through OpenCV; these are Pillow's counterparts (area: Pillow's BOX is the same pixel-area
# average when shrinking), so the pixels can differ from sd-scripts' in the last bits.
RESIZE_FILTERS = {
    "lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "linear": Image.BILINEAR,
    "bicubic": Image.BICUBIC, "cubic": Image.BICUBIC, "area": Image.BOX, "box": Image.BOX,
}


class ImageError(Exception):
    """An image that cannot be used; the message says why."""


@dataclass
class ImageInfo:
    size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str
    mode: str
    frames: int
    has_alpha: bool


def probe(path: Path) -> ImageInfo:
    """Header-only check. Raises ImageError with the reason for files that cannot train."""
    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise ImageError(msg("cannot read file ({reason})", reason=e.strerror)) from e
    if file_size == 0:
        raise ImageError(msg("empty file (0 bytes)"))
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format or "?"
            mode = im.mode
            if w < 1 or h < 1:
                raise ImageError(msg("invalid size {size}", size=f"{w}x{h}"))
            if w * h > MAX_PIXELS:
                raise ImageError(msg("too large ({size} = {mp} MP; the limit is {limit} MP)", size=f"{w}x{h}", mp=f"{w * h / 1e6:.0f}",
                                     limit=f"{MAX_PIXELS / 1e6:.0f}"))
            frames = getattr(im, "n_frames", 1)
            # JPEG and WebP carry EXIF in the header; Pillow's PNG getexif() decodes the whole image
            orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "WEBP", "MPO") else 1
            has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        _check_complete(path, _format_from_magic(path), file_size)  # a cut-off download says so
        if isinstance(e, Image.UnidentifiedImageError):
            raise ImageError(msg("cannot decode: not an image, or a format Pillow cannot read")) from None
        raise ImageError(msg("cannot read image header ({error})", error=e)) from e
    _check_complete(path, fmt, file_size)
    if orientation in _ROTATED:
        w, h = h, w
    return ImageInfo((w, h), fmt, mode, frames, has_alpha)


def _format_from_magic(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG"):
        return "PNG"
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_complete(path: Path, fmt: str | None, file_size: int) -> None:
    """Truncated downloads: PNG must end with IEND, JPEG with an EOI marker, WebP must fill its RIFF size."""
    with open(path, "rb") as f:
        if fmt == "PNG":
            f.seek(max(0, file_size - 12))
            if b"IEND" not in f.read():
                raise ImageError(msg("truncated PNG (no IEND chunk at the end)"))
        elif fmt == "JPEG":
            f.seek(max(0, file_size - 1024))
            if b"\xff\xd9" not in f.read():
                raise ImageError(msg("truncated JPEG (no end-of-image marker)"))
        elif fmt == "WEBP":
            header = f.read(12)
            riff_size = int.from_bytes(header[4:8], "little") + 8
            if file_size < riff_size:
                raise ImageError(msg("truncated WebP ({size} of {expected} bytes)", size=file_size, expected=riff_size))


def load_rgb(path: Path, keep_alpha: bool = False) -> Image.Image | tuple[Image.Image, Image.Image | None]:
    """Decode for training. With keep_alpha, returns (rgb, alpha mask or None) for a masked loss."""
    try:
        with Image.open(path) as im:
            im.seek(0)  # first frame of GIF / animated WebP
            im = ImageOps.exif_transpose(im)
            im.load()
            rgb, alpha = _to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(msg("cannot decode image ({error})", error=e)) from e
    return (rgb, alpha) if keep_alpha else rgb


def _to_rgb(im: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert() clips instead of scaling down to 8 bits
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), rgba.getchannel("A")
    return im.convert("RGB"), None


def check_interpolation(value: str | None, where: str) -> None:
    """UserError naming `where` for a resize_interpolation that sd-scripts does not know."""
    if value is not None and value not in RESIZE_FILTERS:
        raise UserError(msg("{where}: resize_interpolation '{value}' is not one of {choices}", where=where, value=value,
                            choices=", ".join(RESIZE_FILTERS)))


def resize(im: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Scale to `size` with the named filter; None: Lanczos to shrink, bicubic to enlarge."""
    if im.size == tuple(size):
        return im
    if interpolation is None:
        method = Image.LANCZOS if size[0] < im.width else Image.BICUBIC
    else:
        method = RESIZE_FILTERS[interpolation]
    return im.resize(size, method)
