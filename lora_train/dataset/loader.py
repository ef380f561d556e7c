"""Batches for the trainer, drawn per bucket in sd-scripts' order, with captions processed and
images augmented per sample; pixels, or cached VAE posteriors when latents are cached.

A batch is made in two parts: its random choices (`draw`: captions, flips, crops, hue shifts, in one
order from the run's RNG) and the image work (`_image`: decode, resize, crop, flip, shift). Without a
latent cache the image work of the coming batches runs in `workers` threads while the current step
trains (`feed`, sd-scripts' max_data_loader_n_workers); the choices are drawn in the same order from
the same RNG state either way, so the batches are bit for bit the ones the one-at-a-time path makes.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

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


@dataclass
class Draws:
    """A batch's random choices; `augment`: per image its crop box and hue shift (None without
    color_aug), empty when latents are cached (no crop or colour is drawn then)."""
    items: list[Item]
    captions: list[str]
    flips: list[bool]
    augment: list[tuple[tuple[int, int, int, int], float | None]]


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


def held_out_batches(plan: DatasetPlan, limit: int | None = None) -> list[list[Item]]:
    """The held-out images, each once, in batches of their dataset's batch size that never mix
    buckets, always in the same order; the first `limit` batches (max_validation_steps) when given."""
    out = []
    for b in plan.blocks:
        if b.held_out is not None:
            for entries in b.held_out.groups().values():
                items = [e.item for e in entries]
                out += [items[i : i + b.batch_size] for i in range(0, len(items), b.batch_size)]
    return out if limit is None else out[:limit]


class TrainingData:
    def __init__(self, plan: DatasetPlan, seed: int, cache: LatentCache | None = None, workers: int = 0):
        self.plan = plan
        self.seed = seed
        self.cache = cache
        self.workers = workers  # image threads for `feed`; 0: every image in the training thread, when needed
        self._pool: ThreadPoolExecutor | None = None
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

    def validation_batches(self, limit: int | None = None) -> list[list[Item]]:
        return held_out_batches(self.plan, limit)

    def _image(self, item: Item, flip: bool, box: tuple[int, int, int, int], hue: float | None) -> torch.Tensor:
        """The image work of one sample, with its choices already drawn: safe in any thread."""
        im = _resize_crop(load_rgb(item.path), self.plan.assignment(item), box, item.subset.resize_interpolation)
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if hue is not None:
            im = _shift_hue(im, hue)
        return _to_tensor(im)

    def draw(self, items: list[Item], epoch: int, rng: random.Random, step: int = 0, validation: bool = False) -> Draws:
        """The random choices of a batch of `items`, all from `rng`, in this order: every caption, every
        flip, then per image its crop and its hue shift. `step`: the optimizer steps done before the
        batch, which the token warm-up counts. `validation`: held-out images, with their captions whole."""
        options = self._validation_options if validation else self._options
        captions = [cap.process_caption(i.caption, options[id(i.subset)], epoch, rng, step, self.plan.total_steps) for i in items]
        flips = [bool(i.subset.flip_aug and rng.random() < 0.5) for i in items]
        augment = []
        if self.cache is None:  # cached items have no random crop or colour (checked above)
            for i in items:
                box = crop_box(self.plan.assignment(i), i.subset.random_crop, rng)
                augment.append((box, rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES) if i.subset.color_aug else None))
        return Draws(items, captions, flips, augment)

    def _batch(self, d: Draws, pixels: list[torch.Tensor]) -> Batch:
        is_reg = torch.tensor([i.is_reg for i in d.items], dtype=torch.bool)
        return Batch(d.items, d.captions, is_reg, pixels=torch.stack(pixels), sizes=self._sizes(d.items, [b for b, _ in d.augment], d.flips))

    def load(self, items: list[Item], epoch: int, rng: random.Random, encode: Callable[[torch.Tensor], tuple] | None = None,
             step: int = 0, validation: bool = False) -> Batch:
        """Captions and images for `items`, made now in this thread (see `draw` for `step` and
        `validation`). With a cache, `encode(pixels)` gives a posterior to store."""
        d = self.draw(items, epoch, rng, step, validation)
        if self.cache is None:
            return self._batch(d, [self._image(i, f, box, hue) for i, f, (box, hue) in zip(items, d.flips, d.augment)])
        means, stds = zip(*(self._cached_posterior(item, flip, encode) for item, flip in zip(items, d.flips)))
        boxes = [crop_box(self.plan.assignment(i)) for i in items]
        is_reg = torch.tensor([i.is_reg for i in items], dtype=torch.bool)
        return Batch(items, d.captions, is_reg, posterior=(torch.stack(means), torch.stack(stds)), sizes=self._sizes(items, boxes, d.flips))

    def feed(self, batches: list[list[Item]], epoch: int, rng: random.Random, encode: Callable[[torch.Tensor], tuple] | None = None,
             first_step: int = 0, accumulation: int = 1) -> Iterator[Batch]:
        """The batches of `batches` in order, as `load` makes them; batch j counts `first_step + j //
        accumulation` steps done. With `workers` and no cache, the images of the next batches are
        made in threads while the caller trains on this one: the choices are drawn ahead from a copy
        of `rng`, and `rng` is set, as each batch is handed out, to the state the one-at-a-time path
        would leave it in (a run saved after it resumes the same). Close it to drop the batches made
        ahead (their errors included: an image fails when its batch is handed out, as it would now)."""
        if self.cache is not None or self.workers < 1:
            for j, items in enumerate(batches):
                yield self.load(items, epoch, rng, encode, step=first_step + j // accumulation)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lora-train-images")
        ahead = random.Random()
        ahead.setstate(rng.getstate())
        todo = iter(enumerate(batches))
        queue: collections.deque = collections.deque()

        def submit() -> None:
            job = next(todo, None)
            if job is not None:
                j, items = job
                d = self.draw(items, epoch, ahead, first_step + j // accumulation)
                futures = [self._pool.submit(self._image, i, f, box, hue) for i, f, (box, hue) in zip(items, d.flips, d.augment)]
                queue.append((d, futures, ahead.getstate()))

        try:
            while len(queue) < max(2, self.workers) and len(queue) < len(batches):
                submit()
            while queue:
                d, futures, state = queue.popleft()
                submit()
                pixels = [f.result() for f in futures]
                rng.setstate(state)
                yield self._batch(d, pixels)
        finally:
            for _d, futures, _state in queue:
                for f in futures:
                    f.cancel()

    def close(self) -> None:
        """Stop the image threads (a later `feed` starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _sizes(self, items, boxes, flips) -> torch.Tensor:
        rows = [size_row(i, self.plan.assignment(i), box, f) for i, box, f in zip(items, boxes, flips)]
        return torch.tensor(rows, dtype=torch.float32)

    def _cached_posterior(self, item: Item, flip: bool, encode: Callable[[torch.Tensor], tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.plan.assignment(item)
        # cached items have no random crop or colour (checked above): the centre crop, no hue shift
        compute = lambda: tuple(t[0] for t in encode(self._image(item, flip, crop_box(a), None)[None]))  # noqa: E731
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
