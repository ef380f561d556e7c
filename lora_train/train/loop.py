"""The training loop.

The trainer owns nothing of the host: it hooks the network on at the start, freezes the host model,
and on every exit path (done, cancelled, Ctrl-C, raised) unhooks and restores it exactly. Work is
never lost: a cancelled or failed run writes `<name>-interrupted` (and its state), and a loss that
turns NaN stops the run with the last good save left untouched.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
import time
from pathlib import Path

import torch

from lora_train.dataset.loader import TrainingData
from lora_train.errors import UserError, msg
from lora_train.model import cond as cond_ops
from lora_train.model.adapter import ModelAdapter
from lora_train.model.caption_tokens import TextOptions
from lora_train.network.kind import network_kind
from lora_train.network.files import save_lora
from lora_train.network.network import LoRANetwork
from lora_train.train import base_weights
from lora_train.train import checkpoints
from lora_train.train import events as ev
from lora_train.train import loss as loss_fn
from lora_train.train import max_norm
from lora_train.train import memory
from lora_train.train import noise as noise_fn
from lora_train.train.config import TrainConfig
from lora_train.train.distributed import Distributed
from lora_train.train.hub_upload import HubUpload, resume_folder
from lora_train.train.metadata import save_time_metadata, training_metadata
from lora_train.train.optimizers import build_optimizer, load_optimizer_state, optimizer_eval_mode, optimizer_name, optimizer_train_mode
from lora_train.train.schedulers import build_scheduler, scheduler_label
from lora_train.train.state import load_state, save_state
from lora_train.train.validation import Validation, check as check_validation

SAVE_DTYPES = {None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class Trainer:
    def __init__(self, config: TrainConfig, adapter: ModelAdapter, network: LoRANetwork, data: TrainingData, sample_fn=None):
        self.config = config
        self.adapter = adapter
        self.network = network
        self.data = data
        self.plan = data.plan
        self.seed = data.seed
        self.sample_fn = sample_fn  # (epoch, step) -> list of image paths, rendered with the LoRA applied
        self.train_unet = not config.network.network_train_text_encoder_only
        self.train_te = not config.network.network_train_unet_only and adapter.can_train_text_encoder()
        self.output_dir = Path(config.saving.output_dir)
        self.step = 0
        self.epoch = 1
        self.batches_done = 0  # micro-batches consumed in the current epoch
        self.last_save: Path | None = None
        # what reading the config said comes first: the front ends show the notes when the run starts
        self.notes: list[str] = [*config.warnings, *config.notes, *adapter.info.notes]
        self._epoch_losses: list[float] = []
        self.uploader: HubUpload | None = None  # set in run() when huggingface_repo_id is
        self._save_requested = threading.Event()  # "Save now" from a front end, taken after the current step
        # TrainingConfig is a NoiseOptions and a LossOptions (it inherits their fields)
        self.noise_options = self.loss_options = config.training

    # -- public ----------------------------------------------------------------------------------
    def run(self, listener: ev.Listener | None = None, cancel: threading.Event | None = None) -> Path | None:
        cancel = cancel or threading.Event()
        self._check_config()
        device = self.adapter.device
        self.dist = Distributed.from_env(device)
        emit = (listener or (lambda e: None)) if self.dist.is_main else (lambda e: None)
        self.prepare(device)
        self.uploader = HubUpload.from_config(self.config.saving, lambda text: emit(ev.Notice(text)))
        if self.config.saving.resume:
            self._resume(resume_folder(self.config.saving))
        end_step = self._start_later()
        self.metadata = training_metadata(
            self.config, self.adapter.info, self.network, self.plan, self.plan.scan,
            session_id=random.randint(0, 2**31 - 1), started_at=time.time(), seed=self.seed,
            train_unet=self.train_unet, train_te=self.train_te,
            optimizer=optimizer_name(self.optimizer), lr_scheduler=scheduler_label(self.config.optimizer.lr_scheduler, self.optimizer),
        )
        emit(ev.Started(end_step, self.plan.steps_per_epoch, self.plan.epochs, self.plan.train_images, self.notes,
                        self.step if self.config.saving.resume else None))
        try:
            with self.hooked():
                cancelled = self._loop(emit, cancel)
        except TrainingDiverged as e:
            emit(ev.Failed(e, self.step))
            raise
        except BaseException as e:  # an error, or Ctrl-C: keep what was trained
            path = self._save_interrupted()
            emit(ev.Failed(e, self.step) if not isinstance(e, KeyboardInterrupt) else ev.Cancelled(self.step, path and str(path)))
            raise
        finally:
            self.data.close()  # the image threads (max_data_loader_n_workers) last the run
        if cancelled:
            path = self._save_interrupted()
            emit(ev.Cancelled(self.step, str(path) if path else None))
            return path
        s = self.config.saving
        path = self.save(s.output_name, with_state=s.save_state or s.save_state_on_train_end, final=True)
        if self.uploader is not None:
            self.uploader.wait()
        emit(ev.Finished(str(path), self.step))
        return path

    def request_save(self) -> None:
        """Save `<name>-step<N>` (with state) after the step in progress; safe from any thread."""
        self._save_requested.set()

    def save(self, name: str, with_state: bool = False, final: bool = False) -> Path:
        path = self.output_dir / f"{name}.safetensors"
        if not getattr(self, "dist", Distributed()).is_main:
            return path  # rank 0 writes; every rank holds the same weights
        dtype = SAVE_DTYPES[self.config.saving.save_precision]
        metadata = save_time_metadata(self.metadata, self.epoch, self.step, self.config.saving.no_metadata)
        path = save_lora(path, self.network.kohya_state_dict(dtype), metadata)
        state = None
        if with_state:
            state = save_state(self.output_dir / f"{name}-state", self._state(), {"step": self.step, "epoch": self.epoch,
                               "batches_done": self.batches_done, "lora": path.name, "seed": self.seed})
        self.last_save = path
        if self.uploader is not None:
            self.uploader.saved(path, state, final=final)
        return path

    # -- setup -----------------------------------------------------------------------------------
    def prepare(self, device: torch.device) -> None:
        """Network on the device, generators, optimizer, scheduler and scaler (also what a calibration steps with)."""
        self.network.to(device=device, dtype=torch.float32)  # LoRA weights train in fp32 whatever the host runs
        self.gen = torch.Generator().manual_seed(self.seed)
        self.caption_rng = random.Random(self.seed)
        self.optimizer, self.scheduler = self._optimizer_and_scheduler()
        self.scaler = self._grad_scaler(device)

    @contextlib.contextmanager
    def hooked(self):
        """The model frozen and set up for training with the network applied; restored exactly on exit."""
        file_targets = self.adapter.file_targets()
        targets = {t.name: t.module for t in file_targets}
        t, net = self.config.training, self.config.network
        # base_weights go in after the freeze and come out before it is undone: the host's weights are restored first.
        # attention(): SDPA in the attention layers for the run, unless the host chose its own
        with memory.keep_freed_memory(self.adapter.device.type == "cpu"), self.adapter.frozen(), \
                base_weights.merged(net.base_weights, net.base_weights_multiplier, file_targets), \
                self.adapter.attention(self.train_te), \
                self.adapter.training(t.gradient_checkpointing, self.network.dropout_generator, train_text_encoder=self.train_te), \
                self.network.applied({n: targets[n] for n in self.network.lora_modules}):
            yield

    def _check_config(self) -> None:
        c = self.config
        if c.training.mixed_precision not in ("no", "fp32", "fp16", "bf16"):
            raise UserError(msg("mixed_precision '{value}' must be no, fp16 or bf16", value=c.training.mixed_precision))
        if c.training.mixed_precision == "fp16" and self.adapter.device.type != "cuda":
            raise UserError(msg("mixed_precision fp16 needs a CUDA GPU (its gradients need a GradScaler on the GPU); "
                                "on this device use bf16 or no"))
        if c.saving.save_precision not in SAVE_DTYPES:
            raise UserError(msg("save_precision '{value}' must be one of float, fp16, bf16", value=c.saving.save_precision))
        if c.saving.save_model_as != "safetensors":
            raise UserError(msg("save_model_as '{value}' is not supported: LoRA Train writes safetensors", value=c.saving.save_model_as))
        kind = network_kind(c.network)  # a module or algorithm LoRA Train cannot train is refused here
        if kind.ignored():
            self.notes.append(msg("network_args {keys}: not read by algo={algo}", keys=", ".join(kind.ignored()), algo=kind.algo))
        if kind.algo == "ia3" and kind.preset != "ia3":
            self.notes.append(msg("network_args algo=ia3: LyCORIS recommends preset=ia3 (keys, values and the MLP output only)"))
        convs = [n for n, m in self.network.lora_modules.items() if isinstance(m.org, torch.nn.Conv2d) and m.algorithm in ("IA3", "GLoRA")]
        if convs:  # LyCORIS trains them, ComfyUI reads some; A1111 v1.10's loaders fail on them
            self.notes.append(msg("{algorithm} on {count} convolution layers (e.g. {name}): A1111 v1.10 cannot apply those modules; "
                                  "preset=attn-mlp leaves them out", algorithm=self.network.lora_modules[convs[0]].algorithm,
                                  count=len(convs), name=convs[0]))
        if c.network.bypass_mode:
            self.notes.append(msg("network_args bypass_mode: the same result either way; LoRA Train picks the path per algorithm"))
        if c.training.gradient_accumulation_steps < 1:
            raise UserError(msg("gradient_accumulation_steps must be at least 1"))
        self.notes.extend(max_norm.check(self.network, c.training.scale_weight_norms))
        base_weights.check(c.network.base_weights)
        base_weights.multipliers(c.network.base_weights, c.network.base_weights_multiplier)
        if not self.train_unet and not self.train_te:
            raise UserError(msg("nothing to train: the text encoder cannot be trained on this model and network_train_text_encoder_only is set"))
        self.text_options = TextOptions(c.training.max_token_length, c.training.weighted_captions)
        if c.training.cache_text_encoder_outputs:
            if self.train_te:
                raise UserError(msg("cache_text_encoder_outputs needs network_train_unet_only: a trained text encoder changes its outputs"))
            dynamic = sorted({i.folder for i in self.plan.items if captions_change(i.subset)})
            if dynamic:
                raise UserError(msg("cache_text_encoder_outputs needs captions that do not change between steps; "
                                    "shuffle, dropout, wildcards or token warm-up are set for: {folders}", folders=", ".join(dynamic)))
        self.notes += check_validation(c, self.plan)
        self.notes += loss_fn.validate_options(self.loss_options, self.noise_options, self.adapter.prediction_type,
                                               self.adapter.alphas_cumprod.shape[0])

    def _optimizer_and_scheduler(self):
        o = self.config.optimizer
        unet_lr = o.unet_lr if o.unet_lr is not None else o.learning_rate
        te_lr = o.text_encoder_lr if o.text_encoder_lr is not None else o.learning_rate
        groups = self.network.param_groups(unet_lr, te_lr, self.train_unet, self.train_te)
        if not groups:
            raise UserError(msg("no parameters to train (check network_train_*_only and the learning rates)"))
        optimizer = build_optimizer(o.optimizer_type, groups, o.learning_rate, o.optimizer_args, notes=self.notes)
        scheduler = build_scheduler(o.lr_scheduler, optimizer, self.plan.total_steps, warmup_steps=o.lr_warmup_steps,
                                    num_cycles=o.lr_scheduler_num_cycles, power=o.lr_scheduler_power,
                                    min_lr_ratio=o.lr_scheduler_min_lr_ratio, timescale=o.lr_scheduler_timescale,
                                    decay_steps=o.lr_decay_steps, scheduler_type=o.lr_scheduler_type,
                                    scheduler_args=o.lr_scheduler_args, notes=self.notes)
        return optimizer, scheduler

    def _grad_scaler(self, device: torch.device):
        if self.config.training.mixed_precision == "fp16" and device.type == "cuda":
            return torch.cuda.amp.GradScaler()
        return None

    def _autocast(self):
        mp = self.config.training.mixed_precision
        if mp in ("fp16", "bf16"):
            return torch.autocast(self.adapter.device.type, dtype=torch.float16 if mp == "fp16" else torch.bfloat16)
        return contextlib.nullcontext()

    # -- state -----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "version": 1,
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "network": self.network.kohya_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "generator": self.gen.get_state(),
            "dropout_generator": self.network.dropout_generator.get_state(),
            "caption_rng": _encode_random_state(self.caption_rng.getstate()),
        }

    def _resume(self, folder: str) -> None:
        state = load_state(folder)
        if state.get("seed") != self.seed:
            self.notes.append(msg("resume: the state was trained with seed {seed}; continuing with it", seed=state.get("seed")))
            self.seed = state["seed"]
            self.data.seed = self.seed
        try:
            self.network.load_kohya_state_dict(state["network"])
            load_optimizer_state(self.optimizer, state["optimizer"])
        except (KeyError, ValueError) as e:
            raise UserError(msg("resume: the state in '{folder}' does not fit this network or optimizer ({error})", folder=folder, error=e)) from e
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["generator"])
        self.network.dropout_generator.set_state(state["dropout_generator"])
        self.caption_rng.setstate(_decode_random_state(state["caption_rng"]))
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.notes.append(msg("resumed from '{folder}' at step {step} (epoch {epoch})", folder=folder, step=self.step, epoch=self.epoch))

    def _start_later(self) -> int:
        """sd-scripts' initial_epoch / initial_step: the epoch count (and the epoch numbers in file names)
        starts later, and the LR schedule still starts at 0. Without skip_until_initial_step the step
        count starts at 0 and the data at the start of that epoch, so the run ends with the last epoch,
        earlier; with it, the first steps' batches are skipped, the step count starts at initial_step
        and the run ends at max_train_steps. Returns the step the run ends at."""
        t, plan = self.config.training, self.plan
        if t.initial_step is None and t.initial_epoch is None:
            if t.skip_until_initial_step:
                self.notes.append(msg("skip_until_initial_step: read only with initial_step or initial_epoch"))
            return plan.total_steps
        start = t.initial_step if t.initial_step is not None else (t.initial_epoch - 1) * plan.steps_per_epoch  # initial_step wins
        if start <= 0:  # sd-scripts: initial_epoch 0 or 1, initial_step 0 (or below) change nothing
            return plan.total_steps
        if start >= plan.total_steps:
            raise UserError(msg("initial_step {start} must be below the {total} training steps (max_train_steps)", start=start,
                                total=plan.total_steps))
        if self.config.saving.resume:
            self.notes.append(msg("resume: the step and epoch counts start from initial_step / initial_epoch, not from the state, as in sd-scripts"))
        self.epoch = 1 + start // plan.steps_per_epoch
        if t.skip_until_initial_step:
            self.step = start
            self.batches_done = (start % plan.steps_per_epoch) * self.config.training.gradient_accumulation_steps
            return plan.total_steps
        self.step, self.batches_done = 0, 0
        return min(plan.total_steps, (plan.epochs - self.epoch + 1) * plan.steps_per_epoch)

    def _save_interrupted(self) -> Path | None:
        if self.step == 0:
            return None
        return self.save(f"{self.config.saving.output_name}-interrupted", with_state=True)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self, emit: ev.Listener, cancel: threading.Event) -> bool:
        plan, cfg = self.plan, self.config
        accum = cfg.training.gradient_accumulation_steps
        self.snr_alphas = self.adapter.alphas_cumprod.to(self.adapter.device)
        alphas = self.snr_alphas
        if cfg.training.zero_terminal_snr:
            # sd-scripts weights losses by the SNR of the schedule before this fix
            alphas = noise_fn.zero_terminal_snr_alphas_cumprod(alphas)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        te_cache: dict[str, torch.Tensor] | None = {} if cfg.training.cache_text_encoder_outputs else None
        self.train_alphas, self.te_cache = alphas, te_cache  # the validation pass noises and encodes as the steps do
        vseed = cfg.dataset.validation_seed
        self.validation = Validation(self, vseed if vseed is not None else self.seed)
        self.data.warm_cache(self.adapter.encode_posterior)
        if te_cache is not None:  # every caption once, before the first step, as sd-scripts caches them
            captions = self.data.static_captions()
            with self._autocast():  # the dtype the steps would have cached them in
                for i in range(0, len(captions), 16):
                    self._conditioning(captions[i:i + 16], te_cache)
        self.network.train()
        optimizer_train_mode(self.optimizer)
        pending: list[tuple[int, int, torch.Tensor, dict, dict]] = []
        if cfg.sampling.sample_at_first and self.step == 0:
            self._sample(emit)
        while self.step < plan.total_steps:
            epoch = self.epoch
            batches = self.data.epoch_batches(epoch)
            stepped = False
            # the epoch's batches in order; without cached latents their images are made in threads ahead
            feed = self.data.feed(batches[self.batches_done:], epoch, self.caption_rng, self.adapter.encode_posterior,
                                  first_step=self.step, accumulation=accum)
            with contextlib.closing(feed):
                while self.batches_done < len(batches) and self.step < plan.total_steps:
                    if cancel.is_set():
                        self._flush(pending, emit)
                        return True
                    group = batches[self.batches_done : self.batches_done + accum]
                    step_loss = sum(self._backward(next(feed), alphas, te_cache, accum) for _ in group)
                    self.dist.sum_([step_loss.view(1)])
                    norms = self._optimizer_step(params)
                    self.batches_done += len(group)
                    self.step += 1
                    stepped = True
                    lrs = {g.get("name", f"group{i}"): lr for i, (g, lr) in enumerate(zip(self.optimizer.param_groups, self.scheduler.get_last_lr()))}
                    pending.append((self.step, epoch, step_loss, lrs, norms))
                    if len(pending) >= cfg.training.loss_readback_steps:
                        self._flush(pending, emit)
                    self._after_step(emit, pending)
            self._flush(pending, emit)
            if stepped:  # a resumed run does not repeat the end of an epoch it resumed after
                if self.validation.at_epoch_end(epoch):
                    self._validate(emit, "epoch")
                emit(ev.EpochEnd(epoch, sum(self._epoch_losses) / max(1, len(self._epoch_losses))))
                self._epoch_losses = []
            if self.batches_done < len(batches):
                break  # the step budget ended inside this epoch
            if stepped:
                self._after_epoch(emit)
            if epoch >= plan.epochs:
                break
            self.epoch += 1
            self.batches_done = 0
        self._flush(pending, emit)
        optimizer_eval_mode(self.optimizer)
        return False

    def _backward(self, batch, alphas: torch.Tensor, te_cache, accum: int) -> torch.Tensor:
        # Every rank draws the randomness of the whole global batch, then trains on its slice.
        if batch.posterior is not None:
            latents = self.adapter.sample_latents(*batch.posterior, self.gen)
        else:
            latents = self.adapter.encode_images(batch.pixels, self.gen)
        n = latents.shape[0]
        noise = noise_fn.make_noise(latents, self.noise_options, self.gen)
        t = noise_fn.sample_timesteps(n, self.noise_options, alphas.shape[0], self.gen).to(latents.device)
        noisy = loss_fn.add_noise(latents, noise_fn.perturb_noise_for_input(noise, self.noise_options, self.gen), alphas[t])
        mine = self.dist.local_slice(n)
        if mine.start == mine.stop:
            return torch.zeros((), device=latents.device)
        latents, noise, noisy, t = latents[mine], noise[mine], noisy[mine], t[mine]
        with self._autocast():
            cond = self.adapter.condition(self._conditioning(batch.captions[mine], te_cache), batch.sizes[mine])
            pred = self.adapter.predict(noisy, t, cond)
        tgt = loss_fn.target(latents, noise, alphas[t], self.adapter.prediction_type)
        per_sample = loss_fn.per_sample_loss(pred.float(), tgt.float(), t, alphas, self.adapter.prediction_type, self.loss_options,
                                             snr_alphas_cumprod=self.snr_alphas)
        weights = torch.where(batch.is_reg[mine], self.config.training.prior_loss_weight, 1.0).to(per_sample.device)
        loss = (per_sample * weights).sum() / (n * accum)  # this slice's share of the global batch mean
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    def _conditioning(self, captions: list[str], te_cache):
        if te_cache is None:
            with torch.set_grad_enabled(self.train_te):
                return self.adapter.encode_captions(captions, self.text_options)
        missing = [c for c in dict.fromkeys(captions) if c not in te_cache]
        if missing:
            with torch.no_grad():
                for c, text in zip(missing, cond_ops.split(self.adapter.encode_captions(missing, self.text_options))):
                    te_cache[c] = text
        return cond_ops.stack([te_cache[c] for c in captions])

    def _optimizer_step(self, params) -> dict[str, torch.Tensor]:
        max_grad_norm = self.config.optimizer.max_grad_norm
        self.dist.sum_grads(params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.config.training.scale_weight_norms
        return max_norm.apply(self.network, limit) if limit else {}

    def _flush(self, pending: list, emit: ev.Listener) -> None:
        """Read losses back from the device (one sync) and check them."""
        if not pending:
            return
        values = torch.stack([p[2] for p in pending]).float().cpu().tolist()
        for (step, epoch, _, lrs, norms), value in zip(pending, values):
            if value != value or value in (float("inf"), float("-inf")):
                pending.clear()
                raise TrainingDiverged(self._diverged_message(step, value))
            self._epoch_losses.append(value)
            emit(ev.Step(step, epoch, value, lrs, {k: float(v) for k, v in norms.items()}))
        pending.clear()

    def _diverged_message(self, step: int, value: float) -> str:
        o, t = self.config.optimizer, self.config.training
        kept = msg("the last good save is {path}", path=self.last_save) if self.last_save else msg("nothing was saved before it")
        return msg("the loss became {value} at step {step}; training stopped and {kept}. Likely causes: a learning rate "
                   "too high for this optimizer (learning_rate {lr}, unet_lr {unet_lr}, text_encoder_lr "
                   "{te_lr}), fp16 overflow (mixed_precision {precision}: try bf16 or no), a broken "
                   "image, or a model whose VAE produces NaN latents.", value=value, step=step, kept=kept, lr=o.learning_rate,
                   unet_lr=o.unet_lr, te_lr=o.text_encoder_lr, precision=t.mixed_precision)

    def _validate(self, emit: ev.Listener, kind: str) -> None:
        if self.dist.is_main:  # the other ranks hold the same weights
            emit(ev.Validation(self.step, self.epoch, self.validation.loss(self.step), kind))

    def _after_step(self, emit: ev.Listener, pending: list) -> None:
        s, sm = self.config.saving, self.config.sampling
        if self.validation.at_step(self.step):
            self._flush(pending, emit)  # the step's own loss comes first
            self._validate(emit, "step")
        requested = self._save_requested.is_set()  # "Save now": always with state, so it can be resumed
        if requested:
            self._save_requested.clear()
        periodic = bool(s.save_every_n_steps) and self.step % s.save_every_n_steps == 0 and self.step < self.plan.total_steps
        if requested or periodic:
            self._flush(pending, emit)  # never save weights that might already be NaN
            path = self.save(f"{s.output_name}-step{self.step:08d}", with_state=requested or s.save_state)
            emit(ev.CheckpointSaved(str(path), self.epoch, self.step))
            if periodic:
                old = checkpoints.step_to_remove(self.step, s.save_every_n_steps, s.save_last_n_steps)
                old_state = checkpoints.step_to_remove(self.step, s.save_every_n_steps, s.save_last_n_steps_state or s.save_last_n_steps)
                self._remove(lambda n: f"{s.output_name}-step{n:08d}", old, old_state)
        if sm.sample_every_n_steps and self.step % sm.sample_every_n_steps == 0:
            self._flush(pending, emit)
            self._sample(emit)

    def _after_epoch(self, emit: ev.Listener) -> None:
        s, sm = self.config.saving, self.config.sampling
        epoch = self.epoch
        every = checkpoints.every_n_epochs(s.save_every_n_epochs, s.save_n_epoch_ratio, self.plan.epochs)
        if epoch in checkpoints.save_epochs(every, self.plan.epochs):
            path = self.save(f"{s.output_name}-{epoch:06d}", with_state=s.save_state)
            emit(ev.CheckpointSaved(str(path), epoch, self.step))
            old = checkpoints.epoch_to_remove(epoch, every, s.save_last_n_epochs)
            old_state = checkpoints.epoch_to_remove(epoch, every, s.save_last_n_epochs_state or s.save_last_n_epochs)
            self._remove(lambda n: f"{s.output_name}-{n:06d}", old, old_state)
        if sm.sample_every_n_epochs and epoch % sm.sample_every_n_epochs == 0:
            self._sample(emit)

    def _remove(self, name, lora: int | None, state: int | None) -> None:
        """Remove the LoRA file of save `lora` and the state folder of save `state` (their epoch or step);
        save_last_n_*_state keeps state folders longer or shorter than the LoRA files."""
        if lora is not None:
            (self.output_dir / f"{name(lora)}.safetensors").unlink(missing_ok=True)
        if state is not None:
            shutil.rmtree(self.output_dir / f"{name(state)}-state", ignore_errors=True)

    def _sample(self, emit: ev.Listener) -> None:
        if self.sample_fn is None or not self.dist.is_main:
            return
        self.network.eval()  # no dropout in previews
        optimizer_eval_mode(self.optimizer)
        try:
            paths = self.sample_fn(self.epoch, self.step)
        finally:
            self.network.train()
            optimizer_train_mode(self.optimizer)
        emit(ev.Samples([str(p) for p in paths], self.epoch, self.step))


def captions_change(subset) -> bool:
    return bool(subset.shuffle_caption or subset.caption_dropout_rate or subset.caption_dropout_every_n_epochs
                or subset.caption_tag_dropout_rate or subset.enable_wildcard or subset.token_warmup_step)


def _encode_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_random_state(data) -> tuple:
    version, internal, gauss = data
    return version, tuple(internal), gauss
