"""The step maths, as sd-scripts computes it, and the checks users do by hand before training.

- Regularization images join the training images' buckets; their repeats are raised round-robin
  until they match the training images x repeats (sd-scripts' DreamBoothDataset), so they roughly
  double the steps.
- Steps per epoch = sum over datasets and buckets of ceil(images x repeats / batch size), divided by
  the gradient accumulation steps (rounded up).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lora_train.dataset.buckets import Assignment, BucketConfig, Buckets
from lora_train.dataset.scan import Item, Problem, Scan
from lora_train.dataset.spec import DatasetBlock, DatasetSpec
from lora_train.dataset import validation
from lora_train.errors import UserError, msg

# The community guideline (lora-scripts / Chinese guides): images x repeats x 2 with flip_aug, x 4
# without, should land in this range.
GUIDELINE_RANGE = (1000, 2000)
MAIN_WORDS = re.compile(r"main|full|body|whole|主|全身|整体|立绘", re.I)
CLOSEUP_WORDS = re.compile(r"close|face|head|portrait|detail|特写|脸|头像|近景|细节", re.I)


@dataclass
class BlockPlan:
    block: DatasetBlock
    bucket_config: BucketConfig
    buckets: Buckets
    batch_size: int
    held_out: Buckets | None = None  # validation_split's images, once each

    def report(self) -> dict:
        return self.buckets.report(self.batch_size)


@dataclass
class DatasetPlan:
    scan: Scan
    blocks: list[BlockPlan]
    items: list[Item]  # the items that train, with their effective repeats in `repeats_of`
    repeats_of: dict[int, int]
    train_images: int
    reg_images: int
    train_samples: int
    reg_samples: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    upscaled: list[Item]
    problems: list[Problem]
    warnings: list[str] = field(default_factory=list)
    guideline_total: int = 0
    main_closeup_ratio: float | None = None
    validation: list[Item] = field(default_factory=list)  # held out by validation_split: they never train

    def assignment(self, item: Item) -> Assignment:
        for b in self.blocks:
            for buckets in (x for x in (b.buckets, b.held_out) if x is not None):
                try:
                    return buckets.assignment(item)
                except KeyError:
                    continue
        raise KeyError(item.path)

    def to_dict(self) -> dict:
        buckets = []
        for b in self.blocks:
            for row in b.report()["buckets"]:
                buckets.append({"resolution": list(row["resolution"]), "count": row["images_x_repeats"], "images": row["images"],
                                "batches": row["batches"], "waste": row["waste"], "batch_size": b.batch_size})
        return {
            "train_images": self.train_images,
            "reg_images": self.reg_images,
            "validation_images": len(self.validation),
            "train_samples": self.train_samples,
            "reg_samples": self.reg_samples,
            "buckets": buckets,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "total_steps": self.total_steps,
            "guideline_total": self.guideline_total,
            "guideline_range": list(GUIDELINE_RANGE),
            "main_closeup_ratio": self.main_closeup_ratio,
            "upscaled": [str(i.path) for i in self.upscaled],
            "warnings": self.warnings,
        }


def balance_reg_repeats(train: list[Item], reg: list[Item]) -> dict[int, int]:
    """sd-scripts: register reg images with their repeats until they cover the training samples,
    then add one repeat at a time, round-robin. Reg images beyond that are not used."""
    target = sum(i.repeats for i in train)
    repeats: dict[int, int] = {}
    if not reg or target == 0:
        return repeats
    n, first = 0, True
    while n < target:
        for item in reg:
            if first:
                repeats[id(item)] = item.repeats
                n += item.repeats
            else:
                repeats[id(item)] += 1
                n += 1
            if n >= target:
                break
        first = False
    return repeats


def make_plan(
    scan: Scan,
    spec: DatasetSpec,
    *,
    batch_size: int,
    max_train_epochs: int | None = None,
    max_train_steps: int = 1600,
    gradient_accumulation_steps: int = 1,
    steps_multiple: int = 64,
    seed: int | None = None,
) -> DatasetPlan:
    """`seed`: the run's seed, which picks the held-out images of a dataset without its own validation_seed."""
    if batch_size < 1:
        raise UserError(msg("train_batch_size must be at least 1"))
    problems: list[Problem] = []
    warnings: list[str] = []
    blocks: list[BlockPlan] = []
    used: list[Item] = []
    repeats_of: dict[int, int] = {}
    upscaled: list[Item] = []
    held: list[Item] = []
    for block in spec.datasets:
        cfg = BucketConfig(block.resolution or (512, 512), block.enable_bucket, block.min_bucket_reso, block.max_bucket_reso,
                           block.bucket_reso_steps, block.bucket_no_upscale)
        warnings += cfg.validate(steps_multiple)
        members = {id(s) for s in block.subsets}
        items = [i for i in scan.items if id(i.subset) in members]
        out = _held_out(block, items, seed)
        out_ids = {id(h) for h in out}
        items = [i for i in items if id(i) not in out_ids]
        train = [i for i in items if not i.is_reg]
        reg = [i for i in items if i.is_reg]
        block_repeats = {id(i): i.repeats for i in train}
        block_repeats.update(balance_reg_repeats(train, reg))
        if reg and not train:
            warnings.append(msg("a dataset has regularization images but no training images: they are not used"))
        buckets = Buckets(cfg)
        for item in items:
            if id(item) not in block_repeats:
                continue
            try:
                a = buckets.add(item, *(item.bucket_size or item.size), repeats=block_repeats[id(item)])
            except UserError as e:
                problems.append(Problem(item.path, str(e)))
                continue
            used.append(item)
            repeats_of[id(item)] = block_repeats[id(item)]
            if a.resized[0] > item.size[0] or a.resized[1] > item.size[1]:
                upscaled.append(item)
        held_buckets = Buckets(cfg) if out else None
        for item in out:
            try:
                held_buckets.add(item, *(item.bucket_size or item.size))
                held.append(item)
            except UserError as e:
                problems.append(Problem(item.path, str(e)))
        blocks.append(BlockPlan(block, cfg, buckets, block.batch_size or batch_size, held_buckets))
    batches = sum(b.buckets.steps_per_epoch(b.batch_size) for b in blocks if len(b.buckets))
    per_epoch = math.ceil(batches / gradient_accumulation_steps)
    if per_epoch == 0:
        raise UserError(msg("no usable training images"))
    if max_train_epochs:
        epochs, total = max_train_epochs, max_train_epochs * per_epoch
    else:
        total, epochs = max_train_steps, math.ceil(max_train_steps / per_epoch)
    train_used = [i for i in used if not i.is_reg]
    reg_used = [i for i in used if i.is_reg]
    guideline = sum(i.repeats * (2 if i.subset.flip_aug else 4) for i in train_used)
    if not GUIDELINE_RANGE[0] <= guideline <= GUIDELINE_RANGE[1]:
        warnings.append(msg("images x repeats x {factor} = {total}; the usual guideline is {low}-{high}",
                            factor=msg("2 (flip)") if any(i.subset.flip_aug for i in train_used) else "4", total=guideline,
                            low=GUIDELINE_RANGE[0], high=GUIDELINE_RANGE[1]))
    ratio = _main_closeup_ratio(train_used)
    if ratio is not None and not 3.0 <= ratio <= 5.0:
        warnings.append(msg("main-visual : close-up = {ratio} : 1; the usual guideline is about 4 : 1", ratio=f"{ratio:.1f}"))
    if upscaled:
        warnings.append(msg("{count} images are smaller than their bucket and will be upscaled", count=len(upscaled)))
    return DatasetPlan(
        scan, blocks, used, repeats_of,
        train_images=len(train_used), reg_images=len(reg_used),
        train_samples=sum(repeats_of[id(i)] for i in train_used), reg_samples=sum(repeats_of[id(i)] for i in reg_used),
        steps_per_epoch=per_epoch, epochs=epochs, total_steps=total,
        upscaled=upscaled, problems=problems, warnings=warnings,
        guideline_total=guideline, main_closeup_ratio=ratio, validation=held,
    )


def _held_out(block: DatasetBlock, items: list[Item], seed: int | None) -> list[Item]:
    split = block.validation_split or 0.0
    validation.check_split(split, "validation_split")
    if not split:
        return []
    seed = block.validation_seed if block.validation_seed is not None else (seed or 0)
    out = []
    for subset in block.subsets:
        if validation.splits(subset):
            out += validation.held_out([i for i in items if i.subset is subset], split, seed)
    return out


def _main_closeup_ratio(items: list[Item]) -> float | None:
    main = sum(i.repeats for i in items if MAIN_WORDS.search(i.folder) and not CLOSEUP_WORDS.search(i.folder))
    close = sum(i.repeats for i in items if CLOSEUP_WORDS.search(i.folder))
    return main / close if main and close else None
