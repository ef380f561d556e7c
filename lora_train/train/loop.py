"""The training loop: DDPM noising from the model's own schedule, eps or v target, MSE, AdamW.

The trainer owns nothing of the host: it hooks the network on at the start, freezes the host
model, and on every exit path (done, cancelled, raised) unhooks and restores it exactly.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch

from lora_train.dataset.loader import TrainingData
from lora_train.errors import UserError
from lora_train.model.adapter import ModelAdapter
from lora_train.network.files import save_lora
from lora_train.network.network import LoRANetwork
from lora_train.train import events as ev
from lora_train.train import loss as loss_fn
from lora_train.train.config import TrainConfig
from lora_train.train.metadata import save_time_metadata, training_metadata

SAVE_DTYPES = {None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Trainer:
    def __init__(self, config: TrainConfig, adapter: ModelAdapter, network: LoRANetwork, data: TrainingData):
        self.config = config
        self.adapter = adapter
        self.network = network
        self.data = data
        self.plan = data.plan
        self.seed = data.seed
        self.train_unet = not config.network.network_train_text_encoder_only
        self.train_te = not config.network.network_train_unet_only and adapter.can_train_text_encoder()
        self.output_dir = Path(config.saving.output_dir)
        self.step = 0
        self.epoch = 0

    # -- public ----------------------------------------------------------------------------------
    def run(self, listener: ev.Listener | None = None, cancel: threading.Event | None = None) -> Path | None:
        emit = listener or (lambda e: None)
        cancel = cancel or threading.Event()
        self._check_config()
        started_at = time.time()
        self.metadata = training_metadata(
            self.config,
            self.adapter.info,
            self.network,
            self.plan,
            self.plan.scan,
            session_id=random.randint(0, 2**31 - 1),
            started_at=started_at,
            seed=self.seed,
            train_unet=self.train_unet,
            train_te=self.train_te,
        )
        notes = list(self.adapter.info.notes)
        emit(ev.Started(self.plan.total_steps, self.plan.steps_per_epoch, self.plan.epochs, self.plan.train_images, notes))
        device = self.adapter.device
        self.network.to(device=device, dtype=torch.float32)
        self.network.train()
        targets = {t.name: t.module for t in self.adapter.lora_targets(conv=bool(self.config.network.conv_dim))}
        try:
            with self.adapter.frozen(), self.network.applied(targets):
                cancelled = self._loop(emit, cancel)
        except BaseException as e:
            emit(ev.Failed(e, self.step))
            raise
        if cancelled:
            path = self.save(f"{self.config.saving.output_name}-interrupted") if self.step > 0 else None
            emit(ev.Cancelled(self.step, str(path) if path else None))
            return path
        path = self.save(self.config.saving.output_name)
        emit(ev.Finished(str(path), self.step))
        return path

    def save(self, name: str) -> Path:
        dtype = SAVE_DTYPES[self.config.saving.save_precision]
        path = self.output_dir / f"{name}.safetensors"
        metadata = save_time_metadata(self.metadata, self.epoch, self.step, name)
        return save_lora(path, self.network.kohya_state_dict(dtype), metadata)

    # -- internals ---------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        if c.optimizer.optimizer_type.lower() != "adamw":
            raise UserError(f"optimizer_type '{c.optimizer.optimizer_type}' is not supported yet (use AdamW)")
        if c.optimizer.lr_scheduler != "constant":
            raise UserError(f"lr_scheduler '{c.optimizer.lr_scheduler}' is not supported yet (use constant)")
        if c.training.mixed_precision not in ("no", "fp32"):
            raise UserError(f"mixed_precision '{c.training.mixed_precision}' is not supported yet (use no)")
        if c.saving.save_precision not in SAVE_DTYPES:
            raise UserError(f"save_precision '{c.saving.save_precision}' must be one of float, fp16, bf16")
        if c.saving.save_model_as != "safetensors":
            raise UserError(f"save_model_as '{c.saving.save_model_as}' is not supported: LoRA Train writes safetensors")
        if c.network.network_module not in ("networks.lora", "lora"):
            raise UserError(f"network_module '{c.network.network_module}' is not supported yet (use networks.lora)")
        if not self.train_unet and not self.train_te:
            raise UserError("nothing to train: the text encoder cannot be trained on this model and network_train_text_encoder_only is set")

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optimizer
        unet_lr = o.unet_lr if o.unet_lr is not None else o.learning_rate
        te_lr = o.text_encoder_lr if o.text_encoder_lr is not None else o.learning_rate
        groups = self.network.param_groups(unet_lr, te_lr, self.train_unet, self.train_te)
        if not groups:
            raise UserError("no parameters to train (check network_train_*_only and the learning rates)")
        return torch.optim.AdamW(groups, lr=o.learning_rate)

    def _loop(self, emit: ev.Listener, cancel: threading.Event) -> bool:
        plan, cfg = self.plan, self.config
        gen = torch.Generator().manual_seed(self.seed)
        optimizer = self._optimizer()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        alphas = self.adapter.alphas_cumprod.to(self.adapter.device)
        num_timesteps = alphas.shape[0]
        caption_rng = random.Random(self.seed)
        self.data.warm_cache(self.adapter.encode_posterior)
        for epoch in range(1, plan.epochs + 1):
            self.epoch = epoch
            losses = []
            for items in self.data.epoch_batches(epoch):
                if self.step >= plan.total_steps:
                    break
                if cancel.is_set():
                    return True
                batch = self.data.load(items, epoch, caption_rng, self.adapter.encode_posterior)
                if batch.posterior is not None:
                    latents = self.adapter.sample_latents(*batch.posterior, gen)
                else:
                    latents = self.adapter.encode_images(batch.pixels, gen)
                with torch.set_grad_enabled(self.train_te):
                    cond = self.adapter.encode_captions(batch.captions)
                noise = torch.randn(latents.shape, generator=gen).to(latents.device)
                t = torch.randint(0, num_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
                noisy = loss_fn.add_noise(latents, noise, alphas[t])
                pred = self.adapter.predict(noisy, t, cond)
                per_sample = loss_fn.per_sample_mse(pred, loss_fn.target(latents, noise, alphas[t], self.adapter.prediction_type))
                weights = torch.where(batch.is_reg, cfg.training.prior_loss_weight, 1.0).to(per_sample.device)
                loss = (per_sample * weights).mean()
                loss.backward()
                if cfg.optimizer.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                value = float(loss.detach())
                losses.append(value)
                emit(ev.Step(self.step, epoch, value, {g["name"]: g["lr"] for g in optimizer.param_groups}))
            emit(ev.EpochEnd(epoch, sum(losses) / max(1, len(losses))))
            every = cfg.saving.save_every_n_epochs
            if every and epoch % every == 0 and epoch < plan.epochs:
                path = self.save(f"{cfg.saving.output_name}-{epoch:06d}")
                emit(ev.CheckpointSaved(str(path), epoch, self.step))
        return False
