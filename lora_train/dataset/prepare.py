"""Preparing a dataset by hand before training: every image scaled and cropped to one size.

kohya users do this today in other programs. The output goes to a NEW folder: the source is only
ever read, so a bad crop costs a re-run, never the originals. Folder structure (`10_name/`),
captions (`.txt` / `.caption` with the image's stem) and optional mirrored copies come along.

Output is always PNG: lossless, so the trainer sees exactly the cropped pixels, a `_flip` copy is
an exact mirror, and a JPEG source does not lose a second generation. EXIF rotation, alpha (on
white), CMYK and palettes are already resolved by `load_rgb`, so every output is plain RGB.

"focus" slides the crop window along the side that overflows and keeps the window holding the
most saliency, measured on a copy 128 px on its long side. Saliency is spectral residual (Hou &
Zhang 2007) averaged with centre-surround colour contrast: each alone fails on common backgrounds
(residual on grain and noise, contrast on large smooth colour fields), together they agree on the
subject; see `saliency`. A flat image, or one already of the target shape, is centre-cropped.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from lora_train.dataset.images import IMAGE_EXTENSIONS, ImageError, load_rgb, probe
from lora_train.errors import UserError, close_match_hint, msg

PRESETS = {
    "sd15-512x512": (512, 512),
    "sd15-512x768": (512, 768),
    "sd15-768x512": (768, 512),
    "sdxl-1024x1024": (1024, 1024),
    "sdxl-768x1024": (768, 1024),
    "sdxl-1024x768": (1024, 768),
}
CROPS = ("center", "focus")
CAPTION_EXTENSIONS = (".txt", ".caption")

SALIENCY_SIDE = 128  # long side of the saliency map: enough for a subject, cheap for an FFT
NEAR_BEST = 0.99  # crop windows holding >= 99% of the best window's saliency count as equally good

Progress = Callable[[int, int, Path], None]  # (images done, images total, source image just handled)


def parse_size(text: str | tuple[int, int]) -> tuple[int, int]:
    """'512x768' or a preset name -> (width, height); both sides positive multiples of 64."""
    if isinstance(text, tuple):
        w, h = text
    elif text.strip().lower() in PRESETS:
        w, h = PRESETS[text.strip().lower()]
    else:
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*(\d+)\s*", text, re.IGNORECASE)
        if not m:
            raise UserError(msg("size '{size}' is not WIDTHxHEIGHT (e.g. 512x768) or a preset{hint}; presets: {presets}",
                                size=text, hint=close_match_hint(text.strip().lower(), PRESETS), presets=", ".join(PRESETS)))
        w, h = int(m.group(1)), int(m.group(2))
    bad_w, bad_h = w <= 0 or w % 64, h <= 0 or h % 64
    if bad_w or bad_h:
        # the VAE downsamples 8x and the UNet 8x more: other sizes get cropped or fail in training
        values = dict(size=f"{w}x{h}", width=w, height=h, suggest=f"{max(64, round(w / 64) * 64)}x{max(64, round(h / 64) * 64)}")
        if bad_w and bad_h:
            raise UserError(msg("size {size}: width {width} and height {height} must be a positive multiple of 64 (e.g. {suggest})", **values))
        if bad_w:
            raise UserError(msg("size {size}: width {width} must be a positive multiple of 64 (e.g. {suggest})", **values))
        raise UserError(msg("size {size}: height {height} must be a positive multiple of 64 (e.g. {suggest})", **values))
    return w, h


@dataclass
class PrepareReport:
    written: list[Path] = field(default_factory=list)  # every file created in dst: images, flips, captions
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (source file, reason)
    upscaled: int = 0  # sources smaller than the target on at least one side: expect softer images
    images: int = 0  # source images prepared

    def summary(self) -> str:
        lines = [msg("{images} images prepared, {written} files written, {upscaled} upscaled, {skipped} skipped",
                     images=self.images, written=len(self.written), upscaled=self.upscaled, skipped=len(self.skipped))]
        lines += ["  " + msg("skipped {path}: {reason}", path=path, reason=reason) for path, reason in self.skipped]
        return "\n".join(lines)


def prepare(
    src: str | Path,
    dst: str | Path,
    size: str | tuple[int, int],
    crop: str = "center",
    flip: bool = False,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> PrepareReport:
    """Write every image under src, scaled to cover `size` and cropped to it, as PNG under dst.

    overwrite=True allows a non-empty dst (same-named files are replaced, others left alone); the
    folders may still never overlap.
    """
    width, height = parse_size(size)
    if crop not in CROPS:
        raise UserError(msg("crop '{crop}' is not one of {choices}{hint}", crop=crop, choices=", ".join(CROPS), hint=close_match_hint(crop, CROPS)))
    src, dst = Path(src), Path(dst)
    real_src, real_dst = _check_folders(src, dst, overwrite)
    sources = _images_under(src)
    report = PrepareReport()
    taken: set[Path] = set()  # output paths already used in this run (a.jpg and a.png both want a.png)
    for done, path in enumerate(sources, 1):
        try:
            probe(path)  # size limit and truncation checks, the same ones training applies
            im = load_rgb(path)
        except ImageError as e:
            report.skipped.append((path, str(e)))
        else:
            out_dir = _output_dir(dst / path.parent.relative_to(src), real_src, real_dst)
            report.upscaled += im.width < width or im.height < height
            out = crop_to(im, width, height, crop)
            stem = _claim(out_dir, path.stem, taken)
            captions = [c for c in (path.with_suffix(ext) for ext in CAPTION_EXTENSIONS) if c.is_file()]
            copies = [(stem, out)] + ([(_claim(out_dir, stem + "_flip", taken), ImageOps.mirror(out))] if flip else [])
            for name, image in copies:
                with _atomic(out_dir / f"{name}.png", report) as f:
                    image.save(f, format="PNG")
                for caption in captions:
                    with open(caption, "rb") as text, _atomic(out_dir / (name + caption.suffix), report) as f:
                        shutil.copyfileobj(text, f)
            report.images += 1
        if progress is not None:
            progress(done, len(sources), path)
    return report


def crop_to(im: Image.Image, width: int, height: int, crop: str = "center") -> Image.Image:
    """Scale `im` so it covers width x height, then cut that size out of it."""
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    if size != im.size:
        im = im.resize(size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    if crop == "focus" and (left or top):
        sal = saliency(im)
        if sal is not None:
            left = _best_start(sal.sum(axis=0), im.width, width)
            top = _best_start(sal.sum(axis=1), im.height, height)
    return im.crop((left, top, left + width, top + height))


def saliency(im: Image.Image) -> np.ndarray | None:
    """Where the subject is, as a small map that sums to 1; None for a flat image (centre crop then).

    Two cheap measures, each normalised and averaged. A measure that finds nothing in particular
    spreads evenly and adds the same to every crop window, so the average follows whichever one
    finds a concentrated subject.
    """
    scale = SALIENCY_SIDE / max(im.size)
    small = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BOX)
    rgb = np.asarray(small, dtype=np.float64) / 255.0
    if rgb.std(axis=(0, 1)).max() < 1e-3:
        return None
    maps = [m / m.sum() for m in (_spectral_residual(rgb.mean(axis=2)), _colour_contrast(rgb)) if m.sum() > 1e-12]
    return sum(maps) / len(maps) if maps else None


def _spectral_residual(g: np.ndarray) -> np.ndarray:
    """Hou & Zhang (CVPR 2007): the part of the log spectrum a smoothed spectrum does not predict.

    Ignores smooth colour fields and repeated texture; on its own it whitens the spectrum, which
    makes sensor noise and grain as salient as the subject (hence the contrast measure beside it).
    """
    h, w = g.shape
    # Mirror to 2x: the FFT treats the image as periodic, and the jump between opposite borders
    # would otherwise be the most "salient" thing in any image with a gradient.
    g = np.pad(g, ((0, h), (0, w)), mode="symmetric")
    spectrum = np.fft.fft2(g)
    amplitude = np.abs(spectrum)
    log_amp = np.log(amplitude + 1e-8 * amplitude.max())
    smooth = sum(np.roll(log_amp, (dy, dx), axis=(0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
    sal = np.abs(np.fft.ifft2(np.exp(log_amp - smooth + 1j * np.angle(spectrum)))) ** 2
    return _blur(sal, SALIENCY_SIDE / 40)[:h, :w]


def _colour_contrast(rgb: np.ndarray) -> np.ndarray:
    """Centre-surround difference in an opponent colour space (brightness, red-green, blue-yellow).

    Catches subjects that differ from their surroundings in colour only; the fine blur drops noise
    and the wide surround follows gradients, so neither counts as a subject.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    surround = max(rgb.shape[:2]) / 8
    return sum((_blur(c, 1.0) - _blur(c, surround)) ** 2 for c in ((r + g + b) / 3, r - g, b - (r + g) / 2))


def _best_start(profile: np.ndarray, length: int, window: int) -> int:
    """Offset (in pixels of a side `length` long) of the `window`-long span holding the most of `profile`.

    The profile is coarser than the image, so its integral is interpolated. Among windows that hold
    nearly the best amount, the middle of that run is taken: it centres a subject smaller than the
    crop instead of pushing it to an edge.
    """
    if length <= window:
        return 0
    n = len(profile)
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    starts = np.arange(length - window + 1)
    to_profile = n / length
    scores = np.interp((starts + window) * to_profile, np.arange(n + 1), cumulative) - np.interp(starts * to_profile, np.arange(n + 1), cumulative)
    best = int(np.argmax(scores))
    good = scores >= scores[best] * NEAR_BEST
    lo, hi = best, best
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(good) - 1 and good[hi + 1]:
        hi += 1
    return (lo + hi) // 2


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    a = np.apply_along_axis(lambda r: np.convolve(np.pad(r, radius, mode="reflect"), k, mode="valid"), 0, a)
    return np.apply_along_axis(lambda r: np.convolve(np.pad(r, radius, mode="reflect"), k, mode="valid"), 1, a)


def _check_folders(src: Path, dst: Path, overwrite: bool) -> tuple[Path, Path]:
    if not src.is_dir():
        raise UserError(msg("source folder '{path}' is not a folder", path=src) if src.exists()
                        else msg("source folder '{path}' does not exist", path=src))
    # resolve() follows symlinks, so a link pointing back into the source is caught too
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise UserError(msg("output folder '{path}' is the source folder: choose a new, empty folder", path=dst))
    if d.is_relative_to(s):
        raise UserError(msg("output folder '{dst}' is inside the source folder '{src}': choose a folder outside it", dst=dst, src=src))
    if s.is_relative_to(d):
        raise UserError(msg("the source folder '{src}' is inside the output folder '{dst}': choose a folder outside it", src=src, dst=dst))
    if d.exists() and not d.is_dir():
        raise UserError(msg("output folder '{path}' exists and is a file", path=dst))
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        raise UserError(msg("output folder '{path}' is not empty: choose a new folder (or allow overwriting)", path=dst))
    return s, d


def _images_under(root: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden: caches, editors' backups
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def _output_dir(folder: Path, real_src: Path, real_dst: Path) -> Path:
    # With overwrite=True, dst may already hold a symlinked subfolder: never follow one into the
    # source. Checked before mkdir, which would otherwise create folders through the link.
    real = folder.resolve()
    if real.is_relative_to(real_src) or not real.is_relative_to(real_dst):
        raise UserError(msg("output folder '{path}' leads to '{real}', outside the output folder: refusing to write there", path=folder, real=real))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _claim(folder: Path, stem: str, taken: set[Path]) -> str:
    name, n = stem, 1
    while folder / name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(folder / name)
    return name


@contextmanager
def _atomic(path: Path, report: PrepareReport) -> Iterator[BinaryIO]:
    """Write through a temp file in the same folder, then os.replace: nobody sees half a file."""
    # not mkstemp: its files are private (0600); "xb" creates with the user's umask like any save
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        f = open(tmp, "xb")
        try:
            with f:
                yield f
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:  # disk full, permissions: stop with the file named, not a traceback
        raise UserError(msg("cannot write '{path}': {reason}", path=path, reason=e.strerror or e)) from e
    report.written.append(path)
