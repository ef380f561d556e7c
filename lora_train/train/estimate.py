"""How long a run will take and how much memory it needs, before it starts.

A calibration runs a few real training steps on the loaded model: the run's own network, optimizer,
precision, checkpointing and text-encoder setting, through the trainer's own step code
(`Trainer.hooked`, `_backward`, `_optimizer_step`), on one batch of random pixels (or, with
cache_latents, a random cached posterior) at the size the run trains most of its steps at. The
first step is a warm-up and is not counted; the median of the others is the time per step (one
step slowed by another process does not move it). The model is left exactly as it was (the trainer's
contexts restore it, and the caller's random state is kept); nothing is written but a JSON cache
under the user's cache or work folder, keyed by the model and the settings that change the cost,
so the second estimate of the same settings runs no step at all.

After the steps it times what a run does between steps, once each: a no-grad UNet forward and a
VAE decode of one image (previews, validation), writing the LoRA file and the training state (saves,
into a temporary folder); `train/overheads.py` counts how often the run does each.

From it: seconds per step, the total (steps from the plan, plus encoding the images once when
latents are cached, plus saves, previews and validation), the peak memory (the process's resident
set on CPU, allocated tensors on CUDA), the epochs that fit `max_train_minutes`, and after the run,
how far off it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lora_train.dataset.loader import Batch
from lora_train.dataset.plan import DatasetPlan
from lora_train.errors import UserError, msg
from lora_train.model import cond as cond_ops
from lora_train.model.adapter import ModelAdapter
from lora_train.network.network import LoRANetwork
from lora_train.train import events as ev
from lora_train.train import memory
from lora_train.train import overheads
from lora_train.train.config import TrainConfig
from lora_train.train.distributed import Distributed
from lora_train.train.optimizers import optimizer_eval_mode, optimizer_train_mode

CALIBRATION_VERSION = 3  # raise when the step's cost changes (attention, loader): old cache entries are not read
CALIBRATION_STEPS = 3  # timed steps, after WARMUP_STEPS
WARMUP_STEPS = 1
CACHE_FILE = "estimates.json"


@dataclass
class Estimate:
    seconds_per_step: float  # at the calibration size
    peak_mb: float
    memory: str  # "rss" (the process on CPU) | "cuda" (allocated tensors)
    encode_seconds: float = 0.0  # one image through the VAE (cache_latents: every image once before the first step)
    forward_seconds: float = 0.0  # one image through the UNet without gradients (validation, previews without CFG)
    cfg_forward_seconds: float = 0.0  # the same with its unconditioned twin in one batch of two (a CFG sampler step)
    decode_seconds: float = 0.0  # one latent through the VAE decoder (previews)
    save_seconds: float = 0.0  # one LoRA file written
    state_seconds: float = 0.0  # one training state written (save_state)
    width: int = 0
    height: int = 0
    batch: int = 1
    steps: int = 0  # timed calibration steps
    cached: bool = False  # read from the cache: no step was run now
    sizes: dict = dataclasses.field(default_factory=dict)  # "WxH" -> [forward, cfg_forward, decode] timed at preview sizes
    previews: tuple = ()  # overheads.Preview of each image a sample event renders (this run's, never cached)

    def step_seconds(self, plan: DatasetPlan) -> float:
        """Seconds per step over the plan's buckets: each bucket's batches scaled by its area."""
        return self.seconds_per_step * area_factor(plan, (self.width, self.height))

    def setup_seconds(self, config: TrainConfig, plan: DatasetPlan) -> float:
        d = config.dataset
        if not (d.cache_latents or d.cache_latents_to_disk):
            return 0.0
        return self.encode_seconds * sum(2 if i.subset.flip_aug else 1 for i in plan.items)

    def cost_at(self, width: int, height: int) -> overheads.SizeCost:
        """No-grad unit times at a size: timed there, else the calibration size's scaled by area."""
        timed = self.sizes.get(f"{width}x{height}")
        if timed:
            return overheads.SizeCost(*timed)
        own = overheads.SizeCost(self.forward_seconds, self.cfg_forward_seconds, self.decode_seconds)
        area = self.width * self.height
        return own.scaled(width * height / area) if area else own

    def extras(self, config: TrainConfig, plan: DatasetPlan) -> overheads.Extras:
        """Saves, previews and validation passes of the whole run."""
        return overheads.extras(config, plan, list(self.previews), self.cost_at, save_seconds=self.save_seconds,
                                state_seconds=self.state_seconds, forward_seconds=self.forward_seconds,
                                encode_seconds=self.encode_seconds, area_factor=area_factor(plan, (self.width, self.height)))

    def total_seconds(self, config: TrainConfig, plan: DatasetPlan, steps: int | None = None) -> float:
        """The run; `steps`: of a run that stopped early (its saves, previews and validation are then
        counted in proportion)."""
        extra = self.extras(config, plan).total
        if steps is not None and plan.total_steps:
            extra *= min(1.0, steps / plan.total_steps)
        return self.setup_seconds(config, plan) + self.step_seconds(plan) * (plan.total_steps if steps is None else steps) + extra

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("cached", "previews")}


# -- which settings change the cost --------------------------------------------------------------
def model_id(adapter: ModelAdapter) -> str:
    """The model, cheaply: a file's size and A1111's short hash (64 KiB at 1 MiB), else its name."""
    info = adapter.info
    path = info.path
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            f.seek(0x100000)
            short = hashlib.sha256(f.read(0x10000)).hexdigest()[:10]
        return f"{os.path.getsize(path)}:{short}"
    return f"{info.name or '?'}:{info.family}"


def calibration_size(plan: DatasetPlan) -> tuple[tuple[int, int], int]:
    """(width, height) of the bucket with the most batches, and its dataset's batch size."""
    best = None
    for b in plan.blocks:
        for row in b.report()["buckets"]:
            if best is None or row["batches"] > best[0]:
                best = (row["batches"], tuple(row["resolution"]), b.batch_size)
    if best is None:
        block = plan.blocks[0]
        return tuple(block.bucket_config.resolution), block.batch_size
    return best[1], best[2]


def area_factor(plan: DatasetPlan, size: tuple[int, int]) -> float:
    """The plan's mean batch area (over all its batches) against `size`'s: 1.0 with one bucket at that size."""
    batches = area = 0
    for b in plan.blocks:
        for row in b.report()["buckets"]:
            w, h = row["resolution"]
            batches += row["batches"]
            area += row["batches"] * w * h
    if not batches or not size[0] or not size[1]:
        return 1.0
    return area / batches / (size[0] * size[1])


def cost_key(config: TrainConfig, adapter: ModelAdapter, plan: DatasetPlan) -> dict:
    """Everything that changes how long a step takes or how much memory it needs; nothing else
    (learning rates, epochs, names and folders leave an estimate valid)."""
    t, d, o = config.training, config.dataset, config.optimizer
    (width, height), batch = calibration_size(plan)
    device = adapter.device
    network = {k: v for k, v in dataclasses.asdict(config.network).items() if k not in ("base_weights", "base_weights_multiplier")}
    return {
        "version": CALIBRATION_VERSION,
        "model": model_id(adapter), "family": adapter.info.family, "adapter": type(adapter).__name__, "vae": adapter.info.vae,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "width": width, "height": height, "batch": batch, "accumulation": t.gradient_accumulation_steps,
        "gradient_checkpointing": t.gradient_checkpointing, "mixed_precision": t.mixed_precision,
        "cache_latents": bool(d.cache_latents or d.cache_latents_to_disk), "cache_text_encoder_outputs": t.cache_text_encoder_outputs,
        "max_token_length": t.max_token_length, "scale_weight_norms": t.scale_weight_norms,
        "can_train_text_encoder": adapter.can_train_text_encoder(), "network": network,
        "optimizer": o.optimizer_type, "optimizer_args": list(o.optimizer_args), "max_grad_norm": bool(o.max_grad_norm),
    }


def default_cache_dir() -> Path:
    from lora_train.model.clip_files import cache_dir

    return cache_dir()


class EstimateCache:
    """estimates.json in `folder`: one entry per cost key (its sha1), written whole and atomically."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / CACHE_FILE

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: dict) -> Estimate | None:
        entry = self._read().get(self.digest(key))
        if not isinstance(entry, dict):
            return None
        try:
            return Estimate(**{k: v for k, v in entry.items() if k != "key"}, cached=True)
        except TypeError:  # an entry of another shape: calibrate again
            return None

    def put(self, key: dict, estimate: Estimate) -> None:
        data = self._read()
        data[self.digest(key)] = {**estimate.to_json(), "key": key}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")
        os.replace(tmp, self.path)


# -- calibration ---------------------------------------------------------------------------------
class _RandomBatches:
    """In the trainer's place of its TrainingData: the plan and seed it reads (calibration hands its
    random batch to each step itself)."""

    def __init__(self, plan: DatasetPlan):
        self.plan, self.seed = plan, 0


def _random_batch(config: TrainConfig, adapter: ModelAdapter, plan: DatasetPlan, size: tuple[int, int], n: int) -> tuple[Batch, float]:
    """Random pixels (or their posterior, with cache_latents) with the plan's own captions; and the
    seconds one image took through the VAE encoder."""
    width, height = size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand((n, 3, height, width), generator=gen) * 2 - 1
    captions = [i.caption for i in plan.items[:n]] or [""]
    captions = [captions[i % len(captions)] for i in range(n)]
    sizes = torch.tensor([[height, width, 0, 0, height, width]] * n, dtype=torch.float32)
    batch = Batch([None] * n, captions, torch.zeros(n, dtype=torch.bool), sizes=sizes)
    d = config.dataset
    started = time.perf_counter()  # timed either way: validation encodes its images at every pass when not cached
    mean, std = adapter.encode_posterior(pixels[:1])
    _sync(adapter.device)
    encode_seconds = time.perf_counter() - started
    if not (d.cache_latents or d.cache_latents_to_disk):
        batch.pixels = pixels
    else:
        batch.posterior = (mean.expand(n, *mean.shape[1:]).clone(), std.expand(n, *std.shape[1:]).clone())
    return batch, encode_seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(config: TrainConfig, adapter: ModelAdapter, network: LoRANetwork, plan: DatasetPlan,
              steps: int = CALIBRATION_STEPS, warmup: int = WARMUP_STEPS) -> Estimate:
    """Time `steps` training steps (after `warmup` uncounted ones) of `network` on `adapter`'s model.
    `network` is used up (its weights train); the model is restored exactly."""
    from lora_train.train.loop import Trainer  # the loop imports nothing of this module; kept late all the same

    size, n = calibration_size(plan)
    device = adapter.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch, encode_seconds = _random_batch(config, adapter, plan, size, n)
        trainer = Trainer(config, adapter, network, _RandomBatches(plan))
        trainer._check_config()  # the run's own checks: a config the run refuses is refused here
        trainer.dist = Distributed()
        trainer.prepare(device)
        accum = config.training.gradient_accumulation_steps
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        times = []
        with trainer.hooked():
            alphas = trainer.snr_alphas = adapter.alphas_cumprod.to(device)
            te_cache = {} if config.training.cache_text_encoder_outputs else None
            if te_cache is not None:  # the run encodes every caption once before its first step
                with trainer._autocast():
                    trainer._conditioning(batch.captions, te_cache)
            trainer.network.train()
            optimizer_train_mode(trainer.optimizer)
            memory.reset_peak(device)
            try:
                for i in range(warmup + steps):
                    started = time.perf_counter()
                    loss = sum(trainer._backward(batch, alphas, te_cache, accum) for _ in range(accum))
                    trainer._optimizer_step(params)
                    float(loss)  # the loss read back, as every step of a run does (a device sync)
                    if i >= warmup:
                        times.append(time.perf_counter() - started)
            finally:
                trainer.optimizer.zero_grad(set_to_none=True)
                optimizer_eval_mode(trainer.optimizer)
            peak = memory.peak_mb(device)
            forward_seconds, cfg_forward_seconds, decode_seconds = _time_sampling(trainer, batch)
        save_seconds, state_seconds = _time_saves(trainer)
    return Estimate(statistics.median(times), peak, memory.memory_kind(device), encode_seconds, forward_seconds, cfg_forward_seconds,
                    decode_seconds, save_seconds, state_seconds, size[0], size[1], n, steps)


def _time_sampling(trainer, batch: Batch, repeats: int = 2) -> tuple[float, float, float]:
    """(one image's no-grad UNet forward, the same batched with a twin as CFG runs it, one latent's
    decode) at the batch's size, the network in eval mode as previews and validation run it; the
    median of `repeats` forwards each (the training steps before warmed them up)."""
    adapter = trainer.adapter
    gen = torch.Generator().manual_seed(0)
    trainer.network.eval()
    try:
        with torch.no_grad():
            if batch.posterior is not None:
                latents = adapter.sample_latents(batch.posterior[0][:1], batch.posterior[1][:1], gen)
            else:
                latents = adapter.encode_images(batch.pixels[:1], gen)
            with trainer._autocast():
                cond = adapter.condition(adapter.encode_captions(batch.captions[:1], trainer.text_options), batch.sizes[:1])
            forward, cfg_forward, decode = _time_units(adapter, latents, cond, repeats, trainer._autocast, warm=False)
    finally:
        trainer.network.train()
    return forward, cfg_forward, decode


def _time_units(adapter: ModelAdapter, latents: torch.Tensor, cond, repeats: int, autocast=contextlib.nullcontext,
                warm: bool = True) -> list[float]:
    """[forward of `latents` (one image), of it twice in one batch, its decode], without gradients;
    the median of `repeats` forwards each, after an untimed one with `warm`."""
    device = adapter.device
    t = torch.full((1,), adapter.alphas_cumprod.shape[0] // 2, dtype=torch.long, device=latents.device)
    out = []
    for n in (1, 2):
        x, steps, c = latents.repeat(n, 1, 1, 1), t.repeat(n), cond_ops.repeat(cond, n)
        times = []
        for i in range(repeats + warm):
            started = time.perf_counter()
            with autocast():
                adapter.predict(x, steps, c)
            _sync(device)
            if i >= warm:
                times.append(time.perf_counter() - started)
        out.append(statistics.median(times))
    started = time.perf_counter()
    adapter.decode_latents(latents)
    _sync(device)
    out.append(time.perf_counter() - started)
    return out


def _time_saves(trainer) -> tuple[float, float]:
    """(writing the LoRA file, writing the training state), into a temporary folder removed after."""
    from lora_train.network.files import save_lora
    from lora_train.train.state import save_state

    with tempfile.TemporaryDirectory(prefix="lora-train-estimate-") as folder:
        started = time.perf_counter()
        path = save_lora(Path(folder) / "calibration.safetensors", trainer.network.kohya_state_dict(None), {})
        lora = time.perf_counter() - started
        started = time.perf_counter()
        save_state(Path(folder) / "calibration-state", trainer._state(), {"step": 0, "epoch": 1, "lora": path.name})
        state = time.perf_counter() - started
    return lora, state


def estimate(config: TrainConfig, adapter: ModelAdapter, plan: DatasetPlan, make_network: Callable[[], LoRANetwork],
             cache_dir: str | os.PathLike, run_steps: bool = True, steps: int = CALIBRATION_STEPS,
             previews: list[overheads.Preview] = ()) -> Estimate | None:
    """The cached estimate for these settings, else (with `run_steps`) a calibration, cached; else None.
    `previews`: what each of the run's sample events renders."""
    cache = EstimateCache(cache_dir)
    key = cost_key(config, adapter, plan)
    result = cache.get(key)
    if result is None and run_steps:
        result = calibrate(config, adapter, make_network(), plan, steps)
        cache.put(key, result)
    if result is None:
        return None
    missing = sorted({(p.width, p.height) for p in previews} - {(result.width, result.height)}
                     - {tuple(int(v) for v in k.split("x")) for k in result.sizes})
    if missing and run_steps:  # timed once per size, kept with the estimate
        for width, height in missing:
            result.sizes[f"{width}x{height}"] = time_size(adapter, width, height)
        cache.put(key, result)
    result.previews = tuple(previews)
    return result


def time_size(adapter: ModelAdapter, width: int, height: int, repeats: int = 2) -> list[float]:
    """[forward of one image, of a batch of two, decode of one] without gradients at width x height,
    the median of `repeats` each after one untimed forward (the model without the LoRA: its share of
    a no-grad forward is small); the caller's random state is kept."""
    device = adapter.device
    gen = torch.Generator().manual_seed(0)
    # the run's attention (SDPA outside the WebUI) and allocator setting: previews render inside the run's hooks
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), adapter.attention(False), \
            memory.keep_freed_memory(device.type == "cpu"):
        channels = adapter.encode_posterior(torch.zeros(1, 3, 8, 8))[0].shape[1]
        latents = torch.randn((1, channels, height // 8, width // 8), generator=gen).to(device)
        sizes = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        cond = adapter.condition(adapter.encode_captions([""]), sizes)
        return _time_units(adapter, latents, cond, repeats)


# -- the time budget -----------------------------------------------------------------------------
def fit_epochs(seconds_for: Callable[[int], float], epochs: int, budget_minutes: float) -> int:
    """The most epochs, at most `epochs` (the run's own), whose estimated time `seconds_for(e)` fits the
    budget; 1 when none does."""
    budget = budget_minutes * 60
    for e in range(epochs, 0, -1):
        if seconds_for(e) <= budget:
            return e
    return 1


def cut_to_epochs(plan: DatasetPlan, epochs: int) -> DatasetPlan:
    """The plan as max_train_epochs `epochs` makes it (the step budget may still end inside the last one)."""
    return dataclasses.replace(plan, epochs=min(epochs, plan.epochs), total_steps=min(epochs * plan.steps_per_epoch, plan.total_steps))


def apply_budget(config: TrainConfig, result: Estimate, plan: DatasetPlan) -> str:
    """Set max_train_epochs to what fits max_train_minutes (never above the run's own epochs); one line saying so."""
    budget = config.training.max_train_minutes
    if not budget or budget <= 0:
        raise UserError(msg("max_train_minutes must be above 0"))

    def seconds_for(epochs: int) -> float:
        return result.total_seconds(config, cut_to_epochs(plan, epochs))

    epochs = fit_epochs(seconds_for, plan.epochs, budget)
    minutes = f"{budget:g}"
    if seconds_for(plan.epochs) <= budget * 60:
        return msg("max_train_minutes {budget}: all {epochs} epochs fit (about {time} estimated)", budget=minutes, epochs=epochs,
                   time=duration(seconds_for(plan.epochs)))
    config.training.max_train_epochs = epochs
    steps = cut_to_epochs(plan, epochs).total_steps
    if seconds_for(epochs) > budget * 60:
        return msg("max_train_minutes {budget}: even one epoch takes about {time}; training 1 epoch of {epochs}",
                   budget=minutes, time=duration(seconds_for(epochs)), epochs=plan.epochs)
    return msg("max_train_minutes {budget}: {epochs} of {wanted} epochs fit ({steps} steps, about {time} estimated); max_train_epochs set to {epochs}",
               budget=minutes, epochs=epochs, wanted=plan.epochs, steps=steps, time=duration(seconds_for(epochs)))


# -- what the front ends show --------------------------------------------------------------------
def duration(seconds: float) -> str:
    if seconds < 9.95:  # a tenth of a second still tells a short preview or save from none
        return f"{max(0.0, round(seconds, 1)):g} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


def memory_label(result: Estimate) -> str:
    return msg("RSS") if result.memory == "rss" else msg("CUDA allocated")


def estimate_lines(config: TrainConfig, result: Estimate, plan: DatasetPlan) -> list[str]:
    setup = result.setup_seconds(config, plan)
    lines = [msg("estimate: {per_step} s/step x {steps} steps = {total}; peak memory {memory} MB ({kind})",
                 per_step=f"{result.step_seconds(plan):.3g}", steps=plan.total_steps, total=duration(result.total_seconds(config, plan)),
                 memory=f"{result.peak_mb:.0f}", kind=memory_label(result))]
    if setup:
        lines.append("  " + msg("(with {time} to cache the latents before the first step)", time=duration(setup)))
    extra = result.extras(config, plan)
    if extra.total > 0:
        lines.append("  " + msg("(with {time} for saves {saves}, previews {previews}, validation {validation})", time=duration(extra.total),
                                saves=duration(extra.saves), previews=duration(extra.previews), validation=duration(extra.validation)))
    if result.cached:
        lines.append("  " + msg("from the cache: these settings were calibrated on this model before"))
    else:
        lines.append("  " + msg("from {steps} calibration steps at {width}x{height}, batch {batch}", steps=result.steps,
                         width=result.width, height=result.height, batch=result.batch))
    return lines


def error_percent(estimated: float, measured: float) -> float:
    """How far the estimate was off, in % of the measured value (positive: it said more)."""
    return (estimated - measured) / measured * 100


class RunTimer:
    """A listener that measures a run (time per step, total, peak memory) to compare with its estimate.

    Time per step: from the first step's event to the last one's, per step in between (the first step
    is the warm-up, as in the calibration), less the pauses for saves, previews and validation in
    between: the loop emits each of those right after doing it, so a pause is the time since the event
    before. Total: from Started to the end. Peak memory: since Started."""

    PAUSES = (ev.CheckpointSaved, ev.Samples, ev.Validation)

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.device, self.clock = device, clock
        self.started = self.ended = None
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None
        self.peak_mb: float | None = None
        self.previous: float | None = None  # when the last event came
        self.pauses: list[tuple[float, float]] = []  # (when it ended, seconds)

    def __call__(self, e) -> None:
        now = self.clock()
        if isinstance(e, ev.Started):
            memory.reset_peak(self.device)
            self.started = now
        elif isinstance(e, ev.Step):
            self.last = (e.step, now)
            if self.first is None:
                self.first = self.last
        elif isinstance(e, self.PAUSES) and self.previous is not None:
            self.pauses.append((now, now - self.previous))
        elif isinstance(e, (ev.Finished, ev.Cancelled, ev.Failed)):
            self.ended = now
            self.peak_mb = memory.peak_mb(self.device)
        self.previous = now

    def measured(self) -> tuple[float, float, int] | None:
        """(seconds per step, total seconds, steps run), or None before two steps have run."""
        if self.started is None or self.ended is None or self.first is None or self.last[0] <= self.first[0]:
            return None
        paused = sum(seconds for when, seconds in self.pauses if self.first[1] < when <= self.last[1])
        per_step = (self.last[1] - self.first[1] - paused) / (self.last[0] - self.first[0])
        return per_step, self.ended - self.started, self.last[0] - self.first[0] + 1


def error_line(est_per_step: float, est_total: float, per_step: float, total: float) -> str:
    return msg("estimate vs measured: {est_step} vs {step} s/step ({step_error}), total {est_total} vs {total} ({total_error})",
               est_step=f"{est_per_step:.3g}", step=f"{per_step:.3g}", step_error=f"{error_percent(est_per_step, per_step):+.1f} %",
               est_total=duration(est_total), total=duration(total), total_error=f"{error_percent(est_total, total):+.1f} %")


def after_run_lines(config: TrainConfig, result: Estimate, plan: DatasetPlan, timer: RunTimer) -> list[str]:
    """The estimate's error after a run (nothing when it ran fewer than two steps)."""
    measured = timer.measured()
    if measured is None:
        return []
    per_step, total, steps = measured
    lines = [error_line(result.step_seconds(plan), result.total_seconds(config, plan, steps), per_step, total)]
    if timer.peak_mb:
        lines.append("  " + msg("peak memory: {estimated} vs {measured} MB ({error})", estimated=f"{result.peak_mb:.0f}",
                         measured=f"{timer.peak_mb:.0f}", error=f"{error_percent(result.peak_mb, timer.peak_mb):+.1f} %"))
    return lines
