"""Aspect-ratio bucketing with sd-scripts' rules: the same image size gives the same bucket and the
same resized size as sd-scripts with the same settings (`enable_bucket`, `min_bucket_reso`,
`max_bucket_reso`, `bucket_reso_steps`, `bucket_no_upscale`, `resolution`).

An image is scaled to `Assignment.resized`, then cropped to `Assignment.bucket` (`crop_box`).
Without `enable_bucket` every image goes to `resolution` the same way (scale to cover, crop), which
is what sd-scripts does when latents are cached; its uncached path instead refuses images that are
not already at least `resolution` and only crops them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Sequence

from lora_train.errors import UserError, msg

Size = tuple[int, int]


@dataclass
class BucketConfig:
    resolution: Size | int = (512, 512)  # (width, height), sd-scripts' order
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def validate(self, steps_multiple: int = 64) -> list[str]:
        """Raise UserError for settings sd-scripts refuses (or crashes on); return a note for each
        setting it silently adjusts. `steps_multiple` is the model's granularity: sd-scripts asks
        bucket_reso_steps to divide by 64 for SD1/SD2 and by 32 for SDXL."""
        res = _resolution(self)
        notes = []
        if not self.enable_bucket:
            # sd-scripts ignores the bucket keys here; an off-grid size only fails later in the UNet
            if any(s % steps_multiple for s in res):
                raise UserError(msg("resolution {size} must be a multiple of {step} on each side when enable_bucket is off "
                                    "(e.g. 512 or 512,768)", size=f"{res[0]}x{res[1]}", step=steps_multiple))
            return notes
        lo, hi = _limits(self)
        if self.bucket_reso_steps % steps_multiple:
            raise UserError(msg("bucket_reso_steps is {steps}; it must be divisible by {step} for this model",
                                steps=self.bucket_reso_steps, step=steps_multiple))
        if lo != self.min_bucket_reso:
            notes.append(msg("min_bucket_reso {value} rounded down to {rounded}, a multiple of bucket_reso_steps", value=self.min_bucket_reso, rounded=lo))
        if hi != self.max_bucket_reso:
            notes.append(msg("max_bucket_reso {value} rounded up to {rounded}, a multiple of bucket_reso_steps", value=self.max_bucket_reso, rounded=hi))
        if self.bucket_no_upscale and (self.min_bucket_reso, self.max_bucket_reso) != (256, 1024):
            notes.append(msg("min_bucket_reso and max_bucket_reso have no effect with bucket_no_upscale"))
        return notes


@dataclass(frozen=True)
class Assignment:
    bucket: Size  # (width, height) the image is trained at
    resized: Size  # (width, height) it is scaled to before the crop; covers `bucket`
    ar_error: float  # bucket aspect ratio minus image aspect ratio (signed, as sd-scripts)


def _resolution(cfg: BucketConfig) -> Size:
    r = cfg.resolution
    try:
        w, h = (r, r) if isinstance(r, int) else (int(v) for v in r)
    except (TypeError, ValueError):
        raise UserError(msg("resolution {value} must be a size or (width, height)", value=repr(r))) from None
    if w <= 0 or h <= 0:
        raise UserError(msg("resolution {size} must be positive", size=f"{w}x{h}"))
    return w, h


def _limits(cfg: BucketConfig) -> Size:
    """Effective (min, max) bucket sizes, after the checks and adjustments sd-scripts makes."""
    res = _resolution(cfg)
    steps, lo, hi = cfg.bucket_reso_steps, cfg.min_bucket_reso, cfg.max_bucket_reso
    if steps <= 0:
        raise UserError(msg("bucket_reso_steps must be positive, got {steps}", steps=steps))
    # sd-scripts rounds off-grid limits outwards (with a warning) rather than refusing them
    lo -= lo % steps
    if hi % steps:
        hi += steps - hi % steps
    if lo > hi:
        raise UserError(msg("min_bucket_reso ({low}) is larger than max_bucket_reso ({high})", low=cfg.min_bucket_reso, high=cfg.max_bucket_reso))
    if min(res) < lo:
        raise UserError(msg("min_bucket_reso ({low}) is larger than the shorter side of resolution {size}; "
                            "lower min_bucket_reso or raise resolution", low=cfg.min_bucket_reso, size=f"{res[0]}x{res[1]}"))
    if max(res) > hi:
        raise UserError(msg("max_bucket_reso ({high}) is smaller than the longer side of resolution {size}; "
                            "raise max_bucket_reso or lower resolution", high=cfg.max_bucket_reso, size=f"{res[0]}x{res[1]}"))
    if lo < steps and not cfg.bucket_no_upscale:
        raise UserError(msg("min_bucket_reso ({low}) must be at least bucket_reso_steps ({steps})", low=cfg.min_bucket_reso, steps=steps))
    return lo, hi


@lru_cache(maxsize=32)
def _predefined(res: Size, lo: int, hi: int, steps: int) -> tuple[Size, ...]:
    area = res[0] * res[1]
    side = int(math.sqrt(area) // steps) * steps  # float maths on purpose: sd-scripts' exact rounding
    found = {(side, side)}
    for w in range(lo, hi + 1, steps):
        h = min(hi, int((area // w) // steps) * steps)
        if h >= lo:
            found.update({(w, h), (h, w)})
    return tuple(sorted(found))


def bucket_resolutions(cfg: BucketConfig) -> list[Size]:
    """The predefined buckets, sorted. One bucket (resolution) without enable_bucket; none with
    bucket_no_upscale, whose buckets come from the image sizes themselves."""
    if not cfg.enable_bucket:
        return [_resolution(cfg)]
    lo, hi = _limits(cfg)
    if cfg.bucket_no_upscale:
        return []
    return list(_predefined(_resolution(cfg), lo, hi, cfg.bucket_reso_steps))


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def _from_predefined(resos: Sequence[Size], width: int, height: int) -> Assignment:
    ar = width / height
    if (width, height) in resos:
        reso = (width, height)
    else:
        # first of the closest aspect ratios in sorted order, like numpy's argmin
        reso = min(resos, key=lambda r: abs(r[0] / r[1] - ar))
    if ar > reso[0] / reso[1]:
        scale = reso[1] / height  # wider than the bucket: match heights, crop the sides
    else:
        scale = reso[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return Assignment(reso, resized, reso[0] / reso[1] - ar)


def _no_upscale(cfg: BucketConfig, width: int, height: int) -> Assignment:
    res, steps = _resolution(cfg), cfg.bucket_reso_steps
    max_area = res[0] * res[1]
    ar = width / height
    small = UserError(msg("image {size} is too small or too narrow for bucket_no_upscale: a side would fall under bucket_reso_steps ({steps}) px",
                          size=f"{width}x{height}", steps=steps))
    if width * height > max_area:
        # shrink to the training area, then put one side on the grid: whichever keeps the ratio better
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        w_on_grid = _round_to_steps(rw, steps)
        h_for_w = _round_to_steps(w_on_grid / ar, steps)
        h_on_grid = _round_to_steps(rh, steps)
        w_for_h = _round_to_steps(h_on_grid * ar, steps)
        if h_for_w == 0 or h_on_grid == 0:
            raise small  # sd-scripts divides by zero here
        if abs(w_on_grid / h_for_w - ar) < abs(w_for_h / h_on_grid - ar):
            resized = (w_on_grid, int(w_on_grid / ar + 0.5))
        else:
            resized = (int(h_on_grid * ar + 0.5), h_on_grid)
    else:
        resized = (width, height)
    # never pad: the bucket is the resized size cut down to the grid (so it may be under
    # min_bucket_reso or, for long thin images, over max_bucket_reso)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    if 0 in bucket:
        raise small
    return Assignment(bucket, resized, bucket[0] / bucket[1] - ar)


def assign(cfg: BucketConfig, width: int, height: int) -> Assignment:
    """The bucket, the resized size and the aspect-ratio error sd-scripts gives a width x height image."""
    if width <= 0 or height <= 0:
        raise UserError(msg("image size {size} is not a valid size", size=f"{width}x{height}"))
    if not cfg.enable_bucket:
        return _from_predefined([_resolution(cfg)], width, height)
    if cfg.bucket_no_upscale:
        _limits(cfg)
        return _no_upscale(cfg, width, height)
    return _from_predefined(bucket_resolutions(cfg), width, height)


def crop_box(assignment: Assignment, random_crop: bool = False, rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the bucket inside the resized image. Centre (rounded down), or
    with random_crop a uniform offset per axis, drawn width first as sd-scripts does."""
    (bw, bh), (rw, rh) = assignment.bucket, assignment.resized
    rng = rng or random
    offsets = []
    for trim in (rw - bw, rh - bh):
        if trim <= 0:
            offsets.append(0)
        else:
            offsets.append(rng.randint(0, trim) if random_crop else trim // 2)
    left, top = offsets
    return left, top, left + bw, top + bh


@dataclass
class Entry:
    item: Any
    assignment: Assignment
    repeats: int


class Buckets:
    """Items grouped by bucket; each item counts `repeats` times per epoch, as sd-scripts' folders do."""

    def __init__(self, cfg: BucketConfig):
        if cfg.enable_bucket:
            _limits(cfg)
        else:
            _resolution(cfg)
        self.cfg = cfg
        self._entries: list[Entry] = []
        self._by_id: dict[int, Entry] = {}

    def add(self, item: Any, width: int, height: int, repeats: int = 1) -> Assignment:
        if repeats < 1:
            raise UserError(msg("repeats must be at least 1, got {repeats}", repeats=repeats))
        if id(item) in self._by_id:
            raise ValueError(f"item {item!r} was already added")
        entry = Entry(item, assign(self.cfg, width, height), repeats)
        self._entries.append(entry)
        self._by_id[id(item)] = entry
        return entry.assignment

    def assignment(self, item: Any) -> Assignment:
        return self._by_id[id(item)].assignment

    def __len__(self) -> int:
        return len(self._entries)

    def groups(self) -> dict[Size, list[Entry]]:
        """Entries per bucket, buckets in sorted resolution order (sd-scripts' display order)."""
        out: dict[Size, list[Entry]] = {}
        for e in self._entries:
            out.setdefault(e.assignment.bucket, []).append(e)
        return dict(sorted(out.items()))

    def steps_per_epoch(self, batch_size: int) -> int:
        _check_batch(batch_size)
        return sum(-(-sum(e.repeats for e in es) // batch_size) for es in self.groups().values())

    def batches(self, batch_size: int, rng: random.Random) -> Iterator[list[Any]]:
        """One epoch: each bucket's items (times repeats) shuffled and cut into batches, the last one
        possibly short, then all batches shuffled together. A batch never mixes buckets."""
        _check_batch(batch_size)
        batches = []
        for es in self.groups().values():
            pool = [e.item for e in es for _ in range(e.repeats)]
            rng.shuffle(pool)
            batches += [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(batches)
        yield from batches

    def report(self, batch_size: int) -> dict:
        """Histogram per bucket plus totals. `waste` counts the empty slots of each bucket's short
        last batch; `mean_ar_error` is the mean |ar_error| over images without repeats, like
        sd-scripts' `mean_img_ar_error`."""
        _check_batch(batch_size)
        rows = []
        for reso, es in self.groups().items():
            n = sum(e.repeats for e in es)
            b = -(-n // batch_size)
            rows.append({"resolution": reso, "images": len(es), "images_x_repeats": n, "batches": b, "waste": b * batch_size - n})
        errors = [abs(e.assignment.ar_error) for e in self._entries]
        return {
            "buckets": rows,
            "images": len(self._entries),
            "images_x_repeats": sum(r["images_x_repeats"] for r in rows),
            "batches": sum(r["batches"] for r in rows),
            "waste": sum(r["waste"] for r in rows),
            "mean_ar_error": sum(errors) / len(errors) if errors else 0.0,
        }


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(msg("train_batch_size must be at least 1, got {size}", size=batch_size))
