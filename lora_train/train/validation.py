"""The validation loss: the loss of the network's current weights on the held-out images
(validation_split), as sd-scripts' train_network.py computes it.

- When: after step N when validate_every_n_steps divides N, and at the end of every epoch
  (validate_every_n_epochs: every N-th); max_validation_steps caps the batches of one pass.
- How: without gradients, the network in eval mode (no dropout) and the optimizer in its eval mode,
  at sd-scripts' four fixed timesteps (min_timestep..max_timestep cut in five: 200, 400, 600, 800 by
  default); the value is the mean over batches x timesteps of each batch's mean loss, as sd-scripts
  averages it. sd-scripts' recorder also folds earlier passes of the first epoch into its average;
  here every pass stands on its own.
- Noise, latents, captions and flips come from generators seeded with validation_seed (else the run's
  seed) afresh at every pass, never from the training's own streams: every pass sees the same noise,
  so the curve compares steps fairly, is the same after a resume, and the trained LoRA is the same
  with or without validation.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from lora_train.errors import UserError, msg
from lora_train.train import loss as loss_fn
from lora_train.train import noise as noise_fn
from lora_train.train.optimizers import optimizer_eval_mode, optimizer_train_mode

NUM_TIMESTEPS = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS


def fixed_timesteps(opts: noise_fn.NoiseOptions, num_train_timesteps: int) -> list[int]:
    lo = 0 if opts.min_timestep is None else opts.min_timestep
    hi = num_train_timesteps if opts.max_timestep is None else opts.max_timestep
    return [int(t) for t in np.linspace(lo, hi, NUM_TIMESTEPS + 2, dtype=int)[1:-1]]


class Validation:
    def __init__(self, trainer, seed: int):
        t = trainer.config.training
        self.trainer = trainer
        self.seed = seed
        self.every_steps = t.validate_every_n_steps
        self.every_epochs = t.validate_every_n_epochs
        self.batches = trainer.data.validation_batches(t.max_validation_steps)
        self.timesteps = fixed_timesteps(trainer.noise_options, trainer.adapter.alphas_cumprod.shape[0])
        self._last: tuple[int, float] | None = None  # (step, loss): the epoch's pass after a step pass at the same step

    def at_step(self, step: int) -> bool:
        return bool(self.batches) and bool(self.every_steps) and step % self.every_steps == 0

    def at_epoch_end(self, epoch: int) -> bool:
        return bool(self.batches) and (not self.every_epochs or epoch % self.every_epochs == 0)

    def loss(self, step: int) -> float:
        if self._last is not None and self._last[0] == step:
            return self._last[1]  # the same weights, batches and noise give the same value
        tr = self.trainer
        tr.network.eval()
        optimizer_eval_mode(tr.optimizer)
        try:
            with torch.no_grad():
                value = self._mean_loss()
        finally:
            tr.network.train()
            optimizer_train_mode(tr.optimizer)
        self._last = (step, value)
        return value

    def _mean_loss(self) -> float:
        tr = self.trainer
        gen = torch.Generator().manual_seed(self.seed)
        rng = random.Random(self.seed)
        alphas = tr.train_alphas
        losses = []
        for items in self.batches:
            batch = tr.data.load(items, 1, rng, tr.adapter.encode_posterior, validation=True)
            if batch.posterior is not None:
                latents = tr.adapter.sample_latents(*batch.posterior, gen)
            else:
                latents = tr.adapter.encode_images(batch.pixels, gen)
            with tr._autocast():
                # not the trainer's _conditioning without a cache: it turns gradients on for a trained text encoder
                text = (tr._conditioning(batch.captions, tr.te_cache) if tr.te_cache is not None
                        else tr.adapter.encode_captions(batch.captions, tr.text_options))
                cond = tr.adapter.condition(text, batch.sizes)
            for timestep in self.timesteps:
                noise = noise_fn.make_noise(latents, tr.noise_options, gen)
                t = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=latents.device)
                noisy = loss_fn.add_noise(latents, noise_fn.perturb_noise_for_input(noise, tr.noise_options, gen), alphas[t])
                with tr._autocast():
                    pred = tr.adapter.predict(noisy, t, cond)
                tgt = loss_fn.target(latents, noise, alphas[t], tr.adapter.prediction_type)
                per_sample = loss_fn.per_sample_loss(pred.float(), tgt.float(), t, alphas, tr.adapter.prediction_type,
                                                     tr.loss_options, snr_alphas_cumprod=tr.snr_alphas)
                losses.append(per_sample.mean())
        return float(torch.stack(losses).mean())


def check(config, plan) -> list[str]:
    """Notes for validation keys that ask for nothing here; an error for counts below their minimum."""
    t = config.training
    for key, low in (("validate_every_n_steps", 1), ("validate_every_n_epochs", 1), ("max_validation_steps", 0)):
        value = getattr(t, key)
        if value is not None and value < low:
            raise UserError(msg("{key} must be at least {low}, got {value}", key=key, low=low, value=value))
    if plan.validation:
        return []
    if any(b.block.validation_split for b in plan.blocks):
        return [msg("validation_split: no image was held out (each image folder keeps at least ceil(images x (1 - split)) "
                    "images to train; regularization and metadata subsets are not split): no validation loss")]
    asked = [k for k in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps") if getattr(t, k) is not None]
    return [msg("{keys}: read only with validation_split", keys=", ".join(asked))] if asked else []
