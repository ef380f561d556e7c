"""When a run saves and which older saves it removes, by sd-scripts' rules (train_network.py and
train_util's get_remove_epoch_no / get_remove_step_no / save_and_remove_state_*)."""

from __future__ import annotations

from typing import Optional

from lora_train.errors import UserError, msg


def every_n_epochs(every: Optional[int], ratio: Optional[int], epochs: int) -> Optional[int]:
    """save_n_epoch_ratio N: at least N epoch saves, spread evenly; it replaces save_every_n_epochs."""
    if ratio is None or ratio == 0:
        return every
    if ratio < 0:
        raise UserError(msg("save_n_epoch_ratio must be a positive number of saves, got {value}", value=ratio))
    return max(1, epochs // ratio)


def save_epochs(every: Optional[int], epochs: int) -> list[int]:
    """The epochs that write `<name>-<epoch>`; the last one writes `<name>` instead."""
    return [e for e in range(1, epochs) if every and e % every == 0]


def epoch_to_remove(epoch: int, every: int, last_n: Optional[int]) -> Optional[int]:
    """The epoch save that falls out when `epoch` is saved and only the last `last_n` are kept."""
    if not last_n:
        return None
    old = epoch - every * last_n
    return old if old > 0 else None


def step_to_remove(step: int, every: int, last_n: Optional[int]) -> Optional[int]:
    """save_last_n_steps counts steps, not saves: the save that is now more than `last_n` steps old."""
    if not last_n:
        return None
    old = step - last_n - 1
    old -= old % every
    return old if old > 0 else None
