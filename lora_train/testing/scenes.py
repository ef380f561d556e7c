"""Generated scenes with exact captions: one coloured shape on a plain background.

The tiny pretrained base learns these, the scorer reads them back, and the concept test teaches a
colour pattern the base never saw (`CONCEPT_PATTERN`). Everything is drawn from a seeded
`random.Random`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn large then downscaled, so edges are anti-aliased as in real images

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 210, 40)}
# The concept the base never saw: an object split into a purple top half and an orange bottom half
# (neither colour is in the base's scenes; the VAE saw every colour). Named like a colour.
PATTERNS = {"purple-orange": ((150, 50, 210), (250, 140, 20))}
CONCEPT_PATTERN = "purple-orange"
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
# A bar, not a square: at 64 px (8 x 8 latents) circle and square differ in a few corner pixels, and
# the base drew them at chance; a bar differs from both in its whole outline
BASE_SHAPES = ("circle", "bar", "triangle")
SHAPES = BASE_SHAPES + ("square", "star")  # what the VAE sees; the base's scenes have no squares or stars
POSITIONS = ("left", "right")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    background: str
    radius: float = 13.0  # half the object's width, in output pixels
    dx: float = 0.0  # jitter of the centre
    dy: float = 0.0

    @property
    def centre(self) -> tuple[float, float]:
        x = SIZE * (0.27 if self.position == "left" else 0.73)
        return x + self.dx, SIZE / 2 + self.dy

    def caption(self, colour: str | None = None) -> str:
        """"a red circle on the left, white background"; `colour` replaces the colour word (a trigger)."""
        return f"a {colour or self.colour} {self.shape} on the {self.position}, {self.background} background"


def random_scene(rng: random.Random, shapes=BASE_SHAPES, **fixed) -> Scene:
    values = dict(
        shape=rng.choice(shapes),
        colour=rng.choice(list(COLOURS)),
        position=rng.choice(POSITIONS),
        background=rng.choice(list(BACKGROUNDS)),
        radius=rng.uniform(11.5, 14.5),
        dx=rng.uniform(-1.5, 1.5),
        dy=rng.uniform(-5.0, 5.0),
    )
    values.update(fixed)
    return Scene(**values)


def shape_points(shape: str, cx: float, cy: float, r: float, rotation: float = 0.0) -> list[tuple[float, float]] | None:
    """Polygon vertices (None for a circle). Bars, squares and triangles are upright, stars point up."""
    if shape == "bar":
        w, h = r * 0.5, r * 1.2  # 2.4 times as tall as wide, three quarters of a circle's area
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)]
    if shape == "square":
        r *= 0.9  # same visual weight as the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        n, radii = 3, (r * 1.15,)
    elif shape == "star":
        n, radii = 10, (r * 1.15, r * 0.45)
    elif shape.startswith("polygon"):
        n, radii = int(shape[7:] or 6), (r,)
    elif shape == "circle":
        return None
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = []
    for i in range(n):
        a = rotation - math.pi / 2 + 2 * math.pi * i / n
        rr = radii[i % len(radii)]
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a) + (r * 0.2 if shape == "triangle" else 0.0)))
    return points


def _draw_shape(d: ImageDraw.ImageDraw, shape, cx, cy, r, fill, rotation=0.0, s=SUPERSAMPLE) -> None:
    points = shape_points(shape, cx * s, cy * s, r * s, rotation)
    if points is None:
        d.ellipse((s * (cx - r), s * (cy - r), s * (cx + r), s * (cy + r)), fill=fill)
    else:
        d.polygon(points, fill=fill)


def draw(scene: Scene, tint=None) -> Image.Image:
    """`tint(rgb) -> rgb` recolours a plain object (the style concept's pastel)."""
    s = SUPERSAMPLE
    im = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    cx, cy = scene.centre
    if scene.colour in PATTERNS:
        top, bottom = PATTERNS[scene.colour]
        mask = Image.new("L", im.size, 0)
        _draw_shape(ImageDraw.Draw(mask), scene.shape, cx, cy, scene.radius, 255)
        lower = Image.new("L", im.size, 0)
        ImageDraw.Draw(lower).rectangle((0, int(cy * s), im.width, im.height), fill=255)
        im.paste(Image.new("RGB", im.size, top), (0, 0), mask)
        im.paste(Image.new("RGB", im.size, bottom), (0, 0), Image.composite(mask, lower, lower))
    else:
        colour = COLOURS[scene.colour]
        _draw_shape(ImageDraw.Draw(im), scene.shape, cx, cy, scene.radius, tint(colour) if tint else colour)
    return im.resize((SIZE, SIZE), Image.BOX)


def broad_image(rng: random.Random) -> Image.Image:
    """What the VAE trains on besides the scenes: any colour, shape, stripe or texture, so that no
    colour or pattern a LoRA may teach is one the VAE cannot encode and decode."""
    s = SUPERSAMPLE
    w = SIZE * s

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    im = Image.new("RGB", (w, w), colour())
    d = ImageDraw.Draw(im)
    kind = rng.random()
    if kind < 0.25:  # stripes or checks as background
        step = rng.randrange(3, 16) * s
        c2 = colour()
        for i in range(0, w, step * 2):
            if rng.random() < 0.5:
                d.rectangle((i, 0, i + step - 1, w), fill=c2)
            else:
                d.rectangle((0, i, w, i + step - 1), fill=c2)
    elif kind < 0.4:  # a linear gradient
        c1, c2 = colour(), colour()
        for y in range(0, w, s):
            t = y / w
            d.rectangle((0, y, w, y + s - 1), fill=tuple(int(a + (b - a) * t) for a, b in zip(c1, c2)))
    for _ in range(rng.randint(1, 3)):
        shape = rng.choice(SHAPES + ("polygon5", "polygon6", "ellipse"))
        cx, cy, r = rng.uniform(6, 58), rng.uniform(6, 58), rng.uniform(4, 18)
        fill = colour()
        if shape == "ellipse":
            r2 = r * rng.uniform(0.4, 1.0)
            d.ellipse((s * (cx - r), s * (cy - r2), s * (cx + r), s * (cy + r2)), fill=fill)
        else:
            _draw_shape(d, shape, cx, cy, r, fill, rotation=rng.uniform(0, 2 * math.pi) if rng.random() < 0.5 else 0.0)
        if rng.random() < 0.2:  # a two-colour object: a band of a second colour across it
            y = s * (cy + rng.uniform(-r, r) / 2)
            d.rectangle((s * (cx - r), y, s * (cx + r), y + s * r / 3), fill=colour())
    return im.resize((SIZE, SIZE), Image.BOX)
