"""Batches for the trainer, drawn per bucket in sd-scripts' order, with captions processed and
images augmented per sample; pixels, or cached VAE posteriors when latents are cached."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from lora_train.dataset import captions as cap
from lora_train.dataset.buckets import Assignment, crop_box
from lora_train.dataset.cache import CacheKey, LatentCache
from lora_train.dataset.images import load_rgb, resize
from lora_train.dataset.plan import DatasetPlan
from lora_train.dataset.scan import Item
from lora_train.dataset.spec import SubsetSpec
from lora_train.errors import UserError, msg

# sd-scripts' color_aug shifts hue only, by up to 8 (OpenCV's 0-179 hue scale: about 16 degrees)
HUE_SHIFT_DEGREES = 16


@dataclass
class Batch:
    items: list[Item]
    captions: list[str]
    is_reg: torch.Tensor  # bool, N
    pixels: torch.Tensor | None = None  # N,3,H,W in [-1, 1]
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # cached (mean, std), N,C,h,w
    # SDXL's size conditioning, N x 6: original height, width; crop top, left; target height, width
    sizes: torch.Tensor | None = None


def size_row(item: Item, a: Assignment, box: tuple[int, int, int, int], flip: bool) -> list[int]:
    """What SDXL is told about an item: its original size, where the crop sits in the resized image
    (measured from the left of the flipped image when flipped) and the bucket it trains at."""
    left, top, right, _ = box
    if flip:
        left = a.resized[0] - right
    return [item.size[1], item.size[0], top, left, a.bucket[1], a.bucket[0]]


def caption_options(subset: SubsetSpec) -> cap.CaptionOptions:
    return cap.CaptionOptions(**{k: getattr(subset, k) for k in cap.CaptionOptions.__dataclass_fields__})


def _resize_crop(im: Image.Image, a: Assignment, box: tuple[int, int, int, int], interpolation: str | None = None) -> Image.Image:
    return resize(im, a.resized, interpolation).crop(box)


def _shift_hue(im: Image.Image, degrees: float) -> Image.Image:
    h, s, v = im.convert("HSV").split()
    shift = int(round(degrees / 360 * 256))
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class TrainingData:
    def __init__(self, plan: DatasetPlan, seed: int, cache: LatentCache | None = None):
        self.plan = plan
        self.seed = seed
        self.cache = cache
        self._options = {id(s): caption_options(s) for b in plan.blocks for s in b.block.subsets}
        # held-out images are scored on the caption the LoRA is used with: no dropout, every tag
        self._validation_options = {k: dataclasses.replace(o, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                                                           caption_tag_dropout_rate=0.0, token_warmup_step=0)
                                    for k, o in self._options.items()}
        if cache is not None:
            bad = sorted({i.folder for i in plan.items if i.subset.random_crop or i.subset.color_aug})
            if bad:
                raise UserError(msg("cache_latents cannot be used with random_crop or color_aug (set in: {folders}): their pixels change every step",
                                    folders=", ".join(bad)))
        if any(i.subset.alpha_mask for i in plan.items):
            raise UserError(msg("alpha_mask (masked loss) is not supported yet"))

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[Item]]:
        """All batches of an epoch, each from one bucket of one dataset, in a seeded random order."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = [batch for b in self.plan.blocks if len(b.buckets) for batch in b.buckets.batches(b.batch_size, rng)]
        rng.shuffle(batches)
        return batches

    def validation_batches(self) -> list[list[Item]]:
        """The held-out images, each once, in batches of their dataset's batch size that never mix
        buckets, always in the same order."""
        out = []
        for b in self.plan.blocks:
            if b.held_out is not None:
                for entries in b.held_out.groups().values():
                    items = [e.item for e in entries]
                    out += [items[i : i + b.batch_size] for i in range(0, len(items), b.batch_size)]
        return out

    def _pixels(self, item: Item, flip: bool, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        a = self.plan.assignment(item)
        im = load_rgb(item.path)
        box = crop_box(a, item.subset.random_crop, rng)
        im = _resize_crop(im, a, box, item.subset.resize_interpolation)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if item.subset.color_aug:
            im = _shift_hue(im, rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES))
        return _to_tensor(im), box

    def load(self, items: list[Item], epoch: int, rng: random.Random, encode: Callable[[torch.Tensor], tuple] | None = None,
             step: int = 0, validation: bool = False) -> Batch:
        """Captions and images for `items`; `step`: the optimizer steps done before them, which the
        token warm-up counts. With a cache, `encode(pixels)` gives a posterior to store. `validation`:
        held-out images, with their captions whole."""
        options = self._validation_options if validation else self._options
        captions = [cap.process_caption(i.caption, options[id(i.subset)], epoch, rng, step, self.plan.total_steps) for i in items]
        flips = [bool(i.subset.flip_aug and rng.random() < 0.5) for i in items]
        is_reg = torch.tensor([i.is_reg for i in items], dtype=torch.bool)
        if self.cache is None:
            pixels, boxes = zip(*(self._pixels(i, f, rng) for i, f in zip(items, flips)))
            return Batch(items, captions, is_reg, pixels=torch.stack(pixels), sizes=self._sizes(items, boxes, flips))
        means, stds = zip(*(self._cached_posterior(item, flip, encode) for item, flip in zip(items, flips)))
        boxes = [crop_box(self.plan.assignment(i)) for i in items]
        return Batch(items, captions, is_reg, posterior=(torch.stack(means), torch.stack(stds)), sizes=self._sizes(items, boxes, flips))

    def _sizes(self, items, boxes, flips) -> torch.Tensor:
        rows = [size_row(i, self.plan.assignment(i), box, f) for i, box, f in zip(items, boxes, flips)]
        return torch.tensor(rows, dtype=torch.float32)

    def _cached_posterior(self, item: Item, flip: bool, encode: Callable[[torch.Tensor], tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.plan.assignment(item)
        # cached items have no random crop or colour (checked above), so no rng is drawn from here
        compute = lambda: tuple(t[0] for t in encode(self._pixels(item, flip, random.Random(0))[0][None]))  # noqa: E731
        return self.cache.get(CacheKey(item.path, a.bucket, a.resized, crop_box(a), flip, item.subset.resize_interpolation), compute)

    def static_captions(self) -> list[str]:
        """Every item's caption, for captions that never change between steps (no shuffle or dropout)."""
        return list(dict.fromkeys(cap.process_caption(i.caption, self._options[id(i.subset)], 1, random.Random(0)) for i in self.plan.items))

    def warm_cache(self, encode: Callable[[torch.Tensor], tuple], progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every image (and its flip, with flip_aug) once before training, like sd-scripts."""
        if self.cache is None:
            return
        todo = [(i, f) for i in self.plan.items for f in ((False, True) if i.subset.flip_aug else (False,))]
        for n, (item, flip) in enumerate(todo, 1):
            self._cached_posterior(item, flip, encode)
            if progress:
                progress(n, len(todo))
