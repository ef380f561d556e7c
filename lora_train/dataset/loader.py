"""Training data at one fixed resolution: images decoded once, batches drawn per epoch.

sd-scripts' order: every image is repeated `repeats` times, the list is shuffled each epoch and cut
into batches, the last one possibly short.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from lora_train.dataset.images import ImageError, load_rgb, resize_center_crop
from lora_train.dataset.scan import Item, Problem, Scan
from lora_train.errors import UserError


@dataclass
class Batch:
    pixels: torch.Tensor  # N,3,H,W in [-1, 1]
    captions: list[str]
    items: list[Item]


class FixedSizeData:
    def __init__(self, scan: Scan, width: int, height: int):
        self.scan = scan
        self.width, self.height = width, height
        self.problems: list[Problem] = list(scan.problems)
        self.items: list[Item] = []
        self._pixels: list[torch.Tensor] = []
        for item in scan.items:
            try:
                im = resize_center_crop(load_rgb(item.path), width, height)
            except ImageError as e:
                self.problems.append(Problem(item.path, str(e)))
                continue
            self.items.append(item)
            self._pixels.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        if not self.items:
            details = "".join(f"\n  {p}" for p in self.problems)
            raise UserError(f"no usable training images in '{scan.root}':{details}")

    @property
    def num_images(self) -> int:
        return len(self.items)

    def expanded(self) -> list[int]:
        return [i for i, item in enumerate(self.items) for _ in range(item.repeats)]

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.expanded()) / batch_size)

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        order = self.expanded()
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def batch(self, indices: list[int]) -> Batch:
        pixels = torch.stack([self._pixels[i] for i in indices]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        items = [self.items[i] for i in indices]
        return Batch(pixels, [it.caption for it in items], items)


def parse_resolution(text: str | None, default: int) -> tuple[int, int]:
    """sd-scripts' `--resolution`: "512" or "width,height"; multiples of 64 (the UNet halves 3 times
    after the VAE's x8)."""
    if text is None:
        return default, default
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        size = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"resolution '{text}' is not a number or 'width,height'") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 64 or any(s % 64 for s in size):
        raise UserError(f"resolution '{text}' must be a multiple of 64 (e.g. 512 or 512,768)")
    return size[0], size[1]
