"""A small synthetic captioned dataset for the demo: coloured shapes on plain backgrounds."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    r = size * rng.uniform(0.25, 0.35)
    cx, cy = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return im


def make_dataset(root: Path, trigger: str = "zkz", count: int = 8, repeats: int = 2, size: int = 64, seed: int = 0) -> Path:
    """`root/<repeats>_<trigger>/` with `count` images and `.txt` captions starting with the trigger."""
    rng = random.Random(seed)
    folder = Path(root) / f"{repeats}_{trigger}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape, color = SHAPES[i % len(SHAPES)], list(COLORS)[i % len(COLORS)]
        draw(shape, COLORS[color], size, rng).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"{trigger}, a {color} {shape}, white background", encoding="utf-8")
    return Path(root)
