"""sd-scripts' validation_split: images held out of training that give the validation loss.

Each image-folder subset is split on its own; regularization subsets and fine-tuning (metadata)
subsets are never split, as in sd-scripts. The rule (sd-scripts' `split_train_val`): the subset's
image paths in sorted order, shuffled by Python's `random` seeded with validation_seed (else the
run's seed); the first ceil(n x (1 - split)) train, the rest are held out. sd-scripts takes its
validation images as the last round(n x split) of that order, which for some n and split (0.35 of
10) is one more than the images left out, so one of them also trains; here the held-out images are
exactly the ones that do not train.
"""

from __future__ import annotations

import math
import random

from lora_train.dataset.scan import Item
from lora_train.errors import UserError, msg


def check_split(split: float, where: str) -> None:
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < 1:
        raise UserError(msg("{where}: validation_split must be a fraction from 0 up to (not including) 1, got {value}",
                            where=where, value=repr(split)))


def held_out(items: list[Item], split: float, seed: int) -> list[Item]:
    """The items of one subset that are held out, in the shuffled order."""
    order = sorted(items, key=lambda i: str(i.path))
    random.Random(seed).shuffle(order)
    return order[math.ceil(len(order) * (1 - split)):]


def splits(subset) -> bool:
    return not subset.is_reg and not subset.metadata_file
