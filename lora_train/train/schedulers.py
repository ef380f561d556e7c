"""LR schedulers by sd-scripts' `lr_scheduler` names, built as its get_scheduler_fix builds them.

The curves are transformers' own schedule functions (the ones sd-scripts calls), except
`cosine_with_min_lr` and `warmup_stable_decay`, which the pinned transformers 4.30.2 lacks and which
are written here with the formulas of the transformers release sd-scripts pins (4.54).
"""

from __future__ import annotations

import importlib
import math
from functools import partial
from typing import Any, Optional, Union

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from lora_train.errors import UserError, close_match_hint, msg
from lora_train.train.optimizers import OptimizerArgs, adafactor_initial_lr, is_schedule_free, parse_optimizer_args

SCHEDULERS = [
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "adafactor",
]
_NOT_YET = ["piecewise_constant"]  # sd-scripts has them; we do not yet

Steps = Union[int, float, str]


def warmup_step_count(warmup: Optional[Steps], total_steps: int, what: str = "lr_warmup_steps") -> int:
    """sd-scripts' int_or_float: an int is a step count, a float below 1 (or "10%") a share of the total steps."""
    if warmup is None:
        return 0
    if isinstance(warmup, str):
        text = warmup.strip()
        try:
            number = float(text.rstrip("%"))
        except ValueError:
            raise UserError(msg("{what} '{value}' is not a number of steps, a ratio below 1 or a percentage", what=what, value=warmup))
        if text.endswith("%"):
            if not 0 <= number <= 100:
                raise UserError(msg("{what} '{value}' must be between 0% and 100%", what=what, value=warmup))
            return int(number / 100.0 * total_steps)
        warmup = number
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        raise UserError(msg("{what} must be 0 or more steps, or a ratio below 1; got {value}", what=what, value=repr(warmup)))
    if isinstance(warmup, float):
        if warmup < 1:
            return int(warmup * total_steps)  # truncates, as sd-scripts does
        if not warmup.is_integer():
            raise UserError(msg("{what} {value}: a step count must be a whole number (a ratio must be below 1)", what=what, value=repr(warmup)))
    return int(warmup)


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    warmup_steps: Optional[Steps] = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    min_lr_ratio: Optional[float] = None,
    timescale: Optional[int] = None,
    decay_steps: Optional[Steps] = 0,
    scheduler_type: str = "",
    scheduler_args: OptimizerArgs = None,
    notes: Optional[list[str]] = None,
) -> LRScheduler:
    """sd-scripts' `lr_scheduler` (+ `lr_warmup_steps`, `lr_scheduler_num_cycles`, `lr_scheduler_power`,
    `lr_scheduler_min_lr_ratio`, `lr_scheduler_timescale`, `lr_decay_steps`, `lr_scheduler_type`, `lr_scheduler_args`).

    Step it after optimizer.step() and before zero_grad(): the adafactor one reads the LR from the gradients.
    """
    notes = notes if notes is not None else []
    name = (name or "constant").strip().lower()
    if num_training_steps < 1:
        raise UserError(msg("the LR scheduler needs at least one training step, got {steps}", steps=num_training_steps))
    kwargs = parse_optimizer_args(scheduler_args, "lr_scheduler_args")
    warmup = warmup_step_count(warmup_steps, num_training_steps)

    if is_schedule_free(optimizer):
        # sd-scripts gives these a do-nothing scheduler: their warmup is the optimizer's own warmup_steps arg
        if name != "constant" or warmup or scheduler_type:
            notes.append(msg("schedule-free optimizer: lr_scheduler '{name}' and lr_warmup_steps are "
                             "ignored (use optimizer_args warmup_steps=N)", name=scheduler_type or name))
        return LambdaLR(optimizer, lambda _: 1.0)

    initial_lr = adafactor_initial_lr(optimizer)
    if initial_lr is not None:
        return _adafactor(optimizer, name, initial_lr, warmup, scheduler_type, notes)
    if name.split(":")[0] == "adafactor":
        raise UserError(msg("lr_scheduler 'adafactor' works only with optimizer_type Adafactor and relative_step=True"))

    if scheduler_type:
        _no_warmup(scheduler_type, warmup)
        return _any_scheduler(scheduler_type, optimizer, kwargs)

    if name == "constant":
        _no_warmup(name, warmup)
        return _call(name, "get_constant_schedule", optimizer, **kwargs)
    if name == "constant_with_warmup":
        return _call(name, "get_constant_schedule_with_warmup", optimizer, num_warmup_steps=warmup, **kwargs)
    if name == "inverse_sqrt":
        return _call(name, "get_inverse_sqrt_schedule", optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs)

    span = dict(num_warmup_steps=warmup, num_training_steps=num_training_steps)
    if name == "linear":
        return _call(name, "get_linear_schedule_with_warmup", optimizer, **span, **kwargs)
    if name == "cosine":
        return _call(name, "get_cosine_schedule_with_warmup", optimizer, **span, **kwargs)
    if name == "cosine_with_restarts":
        return _call(name, "get_cosine_with_hard_restarts_schedule_with_warmup", optimizer, **span,
                     num_cycles=num_cycles, **kwargs)
    if name == "polynomial":
        return _call(name, "get_polynomial_decay_schedule_with_warmup", optimizer, **span, power=power, **kwargs)
    if name == "cosine_with_min_lr":
        # sd-scripts passes half the cycles: 1 cycle is one fall from the peak to the floor
        try:
            return _cosine_with_min_lr(optimizer, **span, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio, **kwargs)
        except TypeError as e:
            raise UserError(msg("lr_scheduler '{name}': {error}", name=name, error=e)) from e
    if name == "warmup_stable_decay":
        decay = warmup_step_count(decay_steps, num_training_steps, "lr_decay_steps")
        if warmup + decay > num_training_steps:
            raise UserError(msg("lr_scheduler '{name}': lr_warmup_steps ({warmup}) and lr_decay_steps ({decay}) add up to more than "
                                "the {total} training steps", name=name, warmup=warmup, decay=decay, total=num_training_steps))
        # sd-scripts: the stable phase is what warmup and decay leave; half the cycles, as for cosine_with_min_lr
        try:
            return _warmup_stable_decay(optimizer, num_warmup_steps=warmup, num_stable_steps=num_training_steps - warmup - decay,
                                        num_decay_steps=decay, num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio or 0.0, **kwargs)
        except TypeError as e:
            raise UserError(msg("lr_scheduler '{name}': {error}", name=name, error=e)) from e

    if name in _NOT_YET:
        raise UserError(msg("lr_scheduler '{name}' is not supported yet; supported: {known}", name=name, known=", ".join(SCHEDULERS)))
    raise UserError(msg("unknown lr_scheduler '{name}'{hint}; known: {known}",
                        name=name, hint=close_match_hint(name, SCHEDULERS), known=", ".join(SCHEDULERS)))


def scheduler_label(name: str, optimizer: torch.optim.Optimizer) -> str:
    """sd-scripts' `ss_lr_scheduler`: it records Adafactor's own schedule as `adafactor:<initial lr>`."""
    initial_lr = adafactor_initial_lr(optimizer)
    return f"adafactor:{initial_lr}" if initial_lr is not None else (name or "constant")


def _no_warmup(name: str, warmup: int) -> None:
    if warmup:
        if name == "constant":
            raise UserError(msg("lr_scheduler '{name}' takes no lr_warmup_steps (got {warmup}); set it to 0 or use constant_with_warmup",
                                name=name, warmup=warmup))
        raise UserError(msg("lr_scheduler '{name}' takes no lr_warmup_steps (got {warmup}); set it to 0", name=name, warmup=warmup))


def _adafactor(optimizer, name: str, initial_lr: float, warmup: int, scheduler_type: str, notes: list[str]) -> LRScheduler:
    """Adafactor with relative_step sets its own LR; sd-scripts then replaces any lr_scheduler with this proxy."""
    from transformers.optimization import AdafactorSchedule

    if scheduler_type:
        raise UserError(msg("lr_scheduler_type '{name}' cannot drive Adafactor with relative_step=True "
                            "(it sets its own LR); set relative_step=False in optimizer_args", name=scheduler_type))
    _no_warmup("adafactor", warmup)
    if name.split(":")[0] != "adafactor":
        notes.append(msg("Adafactor with relative_step sets its own LR: lr_scheduler '{name}' is replaced by adafactor", name=name))
    return AdafactorSchedule(optimizer, initial_lr)


def _call(name: str, function: str, optimizer, **kwargs: Any) -> LRScheduler:
    import transformers.optimization as tfo

    try:
        return getattr(tfo, function)(optimizer, **kwargs)
    except (TypeError, ValueError) as e:  # lr_scheduler_args the function does not take, or out of range
        raise UserError(msg("lr_scheduler '{name}': {error}", name=name, error=e)) from e


def _any_scheduler(path: str, optimizer, kwargs: dict) -> LRScheduler:
    """sd-scripts' lr_scheduler_type: a torch.optim.lr_scheduler class name or a dotted path."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as e:
        raise UserError(msg("lr_scheduler_type '{name}': cannot import {module} ({error})", name=path, module=module_name, error=e))
    cls = getattr(module, attr, None)
    if not callable(cls):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise UserError(msg("lr_scheduler_type '{name}': no such class{hint}", name=path, hint=close_match_hint(attr, public)))
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(msg("lr_scheduler_type '{name}' with lr_scheduler_args {args}: {error}", name=path, args=kwargs, error=e)) from e


def _cosine_with_min_lr_factor(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float,
                               min_lr_rate: float) -> float:
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _cosine_with_min_lr(optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float,
                        min_lr_rate: Optional[float], min_lr: Optional[float] = None) -> LRScheduler:
    if min_lr is not None and min_lr_rate is not None:
        raise UserError(msg("cosine_with_min_lr: set lr_scheduler_min_lr_ratio or lr_scheduler_args min_lr, not both"))
    if min_lr is not None:
        min_lr_rate = min_lr / optimizer.defaults["lr"]  # as transformers: relative to the optimizer's base lr
    if min_lr_rate is None:
        raise UserError(msg("lr_scheduler 'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio (for example 0.1)"))
    factor = partial(_cosine_with_min_lr_factor, num_warmup_steps=num_warmup_steps,
                     num_training_steps=num_training_steps, num_cycles=num_cycles, min_lr_rate=min_lr_rate)
    return LambdaLR(optimizer, factor)


_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def _wsd_factor(step: int, *, num_warmup_steps: int, num_stable_steps: int, num_decay_steps: int, warmup_type: str,
                decay_type: str, min_lr_ratio: float, num_cycles: float) -> float:
    """Warm up from min_lr_ratio to 1, hold 1, decay back to min_lr_ratio, then stay there."""
    if step < num_warmup_steps:
        progress = step / max(1, num_warmup_steps)
        factor = {"linear": progress, "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
                  "1-sqrt": 1.0 - math.sqrt(1.0 - progress)}[warmup_type]
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = (step - num_warmup_steps - num_stable_steps) / max(1, num_decay_steps)
        factor = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)),
                  "1-sqrt": 1.0 - math.sqrt(progress)}[decay_type]
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _warmup_stable_decay(optimizer, num_warmup_steps: int, num_stable_steps: int, num_decay_steps: int, num_cycles: float,
                         min_lr_ratio: float, warmup_type: str = "linear", decay_type: str = "cosine") -> LRScheduler:
    for what, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in _WSD_SHAPES:
            raise UserError(msg("lr_scheduler_args {what}='{value}' must be one of {known}", what=what, value=value, known=", ".join(_WSD_SHAPES)))
    factor = partial(_wsd_factor, num_warmup_steps=num_warmup_steps, num_stable_steps=num_stable_steps, num_decay_steps=num_decay_steps,
                     warmup_type=warmup_type, decay_type=decay_type, min_lr_ratio=min_lr_ratio, num_cycles=num_cycles)
    return LambdaLR(optimizer, factor)
