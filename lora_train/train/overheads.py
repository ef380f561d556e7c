"""What a run does besides its training steps: saves, previews and validation passes.

The estimate prices the steps by calibration; a run also writes a LoRA file (and, with save_state,
its state) at every save, renders every preview prompt at every sample event, and runs the held-out
images through the UNet at every validation pass. A run with a preview every epoch spends much of its
time in them (the 64 px tiny base's 512 px previews: 147 of 157 s), so an estimate of the steps alone
misses by that much.

How many: counted from the config and the plan the way `train/loop.py` schedules them (epoch saves
only after whole epochs, never at the last one, which writes the final file; samples after whole
epochs and every N steps; validation after every epoch that stepped and every N steps).
How long: the calibration's unit times (one LoRA save, one state save, one no-grad UNet forward of
one image and one VAE decode, at the calibration size and at each preview size: a model's cost is
far from proportional to the area when the sizes differ eightfold, as a 512 px preview of a 64 px
model does; scaled by area only where a cached estimate has no time for a size). A sampler
step is one forward, under CFG (scale != 1) one forward of a batch of two; samplers that call the
model twice a step (Heun, DPM2) take longer than this says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from lora_train.dataset.loader import held_out_batches
from lora_train.dataset.plan import DatasetPlan
from lora_train.train import checkpoints
from lora_train.train.config import TrainConfig
from lora_train.train.validation import NUM_TIMESTEPS


@dataclass(frozen=True)
class Preview:
    """One preview image as the sampler will render it."""
    steps: int
    width: int
    height: int
    scale: float = 7.0


@dataclass(frozen=True)
class Schedule:
    saves: int  # LoRA files: periodic step saves, epoch saves, the final one
    state_saves: int
    sample_events: int
    validation_passes: int
    validation_batches: int  # per pass
    validation_images: int  # per pass


def schedule(config: TrainConfig, plan: DatasetPlan) -> Schedule:
    s, sm, t = config.saving, config.sampling, config.training
    total, per_epoch = plan.total_steps, max(1, plan.steps_per_epoch)
    whole_epochs = min(plan.epochs, total // per_epoch)  # the loop's _after_epoch runs only after these
    stepped_epochs = min(plan.epochs, math.ceil(total / per_epoch))
    every = checkpoints.every_n_epochs(s.save_every_n_epochs, s.save_n_epoch_ratio, plan.epochs)
    epoch_saves = sum(1 for e in checkpoints.save_epochs(every, plan.epochs) if e <= whole_epochs)
    step_saves = (total - 1) // s.save_every_n_steps if s.save_every_n_steps else 0  # none at the last step
    periodic = epoch_saves + step_saves
    state_saves = (periodic if s.save_state else 0) + (1 if s.save_state or s.save_state_on_train_end else 0)
    samples = ((1 if sm.sample_at_first else 0)
               + (total // sm.sample_every_n_steps if sm.sample_every_n_steps else 0)
               + (whole_epochs // sm.sample_every_n_epochs if sm.sample_every_n_epochs else 0))
    held_out = held_out_batches(plan, t.max_validation_steps)  # one pass, as Validation takes it
    batches, images = len(held_out), sum(len(b) for b in held_out)
    passes = 0
    if batches:
        passes = (total // t.validate_every_n_steps if t.validate_every_n_steps else 0) + (
            stepped_epochs // t.validate_every_n_epochs if t.validate_every_n_epochs else stepped_epochs)
    return Schedule(periodic + 1, state_saves, samples, passes, batches, images)


@dataclass(frozen=True)
class SizeCost:
    """Seconds without gradients at one image size: a forward of one image, of a batch of two (a CFG
    step runs the prompt and its negative together), a decode."""
    forward: float
    cfg_forward: float
    decode: float

    def scaled(self, factor: float) -> "SizeCost":
        return SizeCost(self.forward * factor, self.cfg_forward * factor, self.decode * factor)


def preview_seconds(previews: list[Preview], cost_at: Callable[[int, int], SizeCost]) -> float:
    """One sample event: every prompt's sampler steps and its decode, at its own size."""
    total = 0.0
    for p in previews:
        c = cost_at(p.width, p.height)
        total += p.steps * (c.cfg_forward if p.scale != 1 else c.forward) + c.decode
    return total


@dataclass(frozen=True)
class Extras:
    """Seconds the run spends outside its steps, by kind."""
    saves: float
    previews: float
    validation: float

    @property
    def total(self) -> float:
        return self.saves + self.previews + self.validation


def extras(config: TrainConfig, plan: DatasetPlan, previews: list[Preview], cost_at: Callable[[int, int], SizeCost], *,
           save_seconds: float, state_seconds: float, forward_seconds: float, encode_seconds: float, area_factor: float) -> Extras:
    """The schedule priced by the calibration's unit times (`cost_at`: at a preview's size;
    `area_factor`: the plan's mean batch area over the calibration's, for the held-out images, which
    sit in the same buckets)."""
    sch = schedule(config, plan)
    d = config.dataset
    saves = sch.saves * save_seconds + sch.state_saves * state_seconds
    shown = preview_seconds(previews, cost_at) * sch.sample_events
    encode = 0.0 if (d.cache_latents or d.cache_latents_to_disk) else encode_seconds  # cached: encoded once, in the setup
    per_pass = (sch.validation_images * (NUM_TIMESTEPS * forward_seconds + encode)) * area_factor
    return Extras(saves, shown, per_pass * sch.validation_passes)
