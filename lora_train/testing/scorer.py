"""A deterministic classifier for the generated scenes: background, colour, shape and position of
the main object, read from the pixels alone (no model, no training).

The object is the largest connected region that differs from the background (the median of the
border). Its shape comes from three numbers that survive blur: its bounding box's height over width (a
bar stands 2.1-2.5 times as tall as it is wide, the others 0.8-1.05), how much of that box it fills (square
1.0, circle 0.79, triangle 0.5) and its solidity, area over convex-hull area (a star's concave outline
gives about 0.5; the others are convex). Its colour is read from its top and bottom
thirds separately, so a two-colour object reads as its pattern ("purple-orange").
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from lora_train.testing.scenes import BACKGROUNDS, COLOURS, PATTERNS


MIN_AREA = 25  # pixels; smaller regions are noise, not an object
STAR_SOLIDITY = 0.75
BAR_ASPECT = 1.6  # drawn bars stand 2.1-2.5 times their width; the other shapes 0.8-1.05
SQUARE_FILL = 0.85
CIRCLE_FILL = 0.70  # drawn circles fill 0.718-0.83 of their box (a small one at 0.718), drawn triangles at most 0.56
PATTERN_CONTRAST = 80.0  # RGB distance between an object's top and bottom thirds that makes it two-coloured
HUE_TOLERANCE = 40.0  # degrees around each half's hue


LABELS = ("colour", "shape", "position", "background")  # what a scene (or prompt) asks for


@dataclass(frozen=True)
class Labels:
    background: str
    colour: str
    shape: str
    position: str
    area: int = 0
    fill: float = 0.0
    solidity: float = 0.0
    rgb: tuple[float, ...] = ()  # the object's median colour
    lightness: float = 0.0  # of `rgb`, 0-1 (HLS)

    def matches(self, scene) -> bool:
        """Every label equal to what the scene (or prompt) asked for."""
        return all(getattr(self, k) == getattr(scene, k) for k in LABELS)

    def as_dict(self) -> dict:
        return asdict(self)


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda k: float(np.sum((rgb - np.asarray(palette[k], dtype=np.float64)) ** 2)))


def _closed(mask: np.ndarray) -> np.ndarray:
    """Dilate then erode by one pixel (3 x 3): joins regions a one-pixel seam splits. Where the halves
    of a two-colour object meet, their anti-aliased mix can come as close to the background as 40,
    which cut the object in two at its middle row."""
    def grow(m, op):
        p = np.pad(m, 1, constant_values=op is np.logical_and)
        out = m.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                out = op(out, p[dy : dy + m.shape[0], dx : dx + m.shape[1]])
        return out

    return grow(grow(mask, np.logical_or), np.logical_and)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(pixels) > len(best):
            best = pixels
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (x, y) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def shape_of(fill: float, solidity: float, aspect: float = 1.0) -> str:
    if solidity < STAR_SOLIDITY:
        return "star"
    if aspect >= BAR_ASPECT:
        return "bar"
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return "triangle"


def _hue_saturation(rgb: np.ndarray) -> tuple[float, float]:
    import colorsys

    h, _, sat = colorsys.rgb_to_hls(*(np.clip(rgb, 0, 255) / 255.0))
    return h * 360.0, sat


def hue_near(rgb, target_rgb, tolerance: float, saturation: float = 0.35) -> bool:
    """A colour at least this saturated (HLS) within `tolerance` degrees of `target_rgb`'s hue."""
    hue, sat = _hue_saturation(np.asarray(rgb, dtype=np.float64))
    target, _ = _hue_saturation(np.asarray(target_rgb, dtype=np.float64))
    return sat > saturation and abs((hue - target + 180.0) % 360.0 - 180.0) <= tolerance


def _colour_of(a: np.ndarray, mask: np.ndarray, ys: np.ndarray) -> str:
    """A palette name for a plain object; a pattern's name when the upper and lower thirds differ
    and each has its half's hue (hue, not exact RGB: a small model shifts new colours towards
    the ones it knows, a purple towards blue); "mixed" for any other two-colour object."""
    top_y, bottom_y = np.percentile(ys, 33), np.percentile(ys, 67)
    rows = np.arange(a.shape[0])[:, None]
    top = np.median(a[mask & (rows <= top_y)], axis=0)
    bottom = np.median(a[mask & (rows >= bottom_y)], axis=0)
    if float(np.sqrt(((top - bottom) ** 2).sum())) < PATTERN_CONTRAST:
        return _nearest((top + bottom) / 2, COLOURS)
    for name, (top_rgb, bottom_rgb) in PATTERNS.items():
        if hue_near(top, top_rgb, HUE_TOLERANCE) and hue_near(bottom, bottom_rgb, HUE_TOLERANCE):
            return name
    return "mixed"


def score(image) -> Labels:
    """Labels for a PIL image or a path to one (any size; read as RGB)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = a.shape
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS)
    diff = np.sqrt(((a - bg) ** 2).sum(axis=2))
    rough = _largest_component(_closed(diff > 40))
    if rough.sum() < MIN_AREA:
        return Labels(background, "none", "none", "none")
    # the object's own colour from its core, then the edge at half-way between it and the background
    core = rough & (diff >= np.percentile(diff[rough], 60))
    rgb = np.median(a[core], axis=0)
    edge = 0.5 * float(np.sqrt(((rgb - bg) ** 2).sum()))
    mask = _largest_component(_closed(diff > max(edge, 25.0)))
    area = int(mask.sum())
    if area < MIN_AREA:
        return Labels(background, "none", "none", "none")
    ys, xs = np.nonzero(mask)
    fill = area / float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    aspect = (ys.max() - ys.min() + 1) / float(xs.max() - xs.min() + 1)
    rgb = np.median(a[mask], axis=0)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    solidity = area / max(_hull_area(corners), 1.0)
    return Labels(
        background=background,
        colour=_colour_of(a, mask, ys),
        shape=shape_of(fill, solidity, aspect),
        position="left" if xs.mean() + 0.5 < w / 2 else "right",
        area=area,
        fill=round(fill, 4),
        solidity=round(solidity, 4),
        rgb=tuple(round(float(c), 1) for c in rgb),
        lightness=round((float(rgb.max()) + float(rgb.min())) / 510.0, 4),
    )
