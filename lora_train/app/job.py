"""A training job from a config: dataset plan, model, network and trainer put together.

Shared by the CLI, the run manager and the tab; the host decides where the model comes from.
"""

from __future__ import annotations

import os
import random
import sys

from lora_train.app.guard import guard_config
from lora_train.dataset.cache import LatentCache, module_fingerprint
from lora_train.dataset.loader import TrainingData
from lora_train.dataset.plan import DatasetPlan, make_plan
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.errors import UserError, msg
from lora_train.host.base import Host
from lora_train.model.adapter import ModelAdapter
from lora_train.network.blocks import LrWeights
from lora_train.network.files import load_lora
from lora_train.network.kind import network_kind
from lora_train.network.norm import ldm_unet_norm_targets, sdxl_unet_norm_targets
from lora_train.network.targets import preset_targets
from lora_train.network.network import LoRANetwork, network_from_file
from lora_train.train.config import TrainConfig
from lora_train.train.loop import Trainer


def plan_dataset(config: TrainConfig, default_resolution: int = 512, steps_multiple: int = 64, seed: int | None = None) -> DatasetPlan:
    t = config.training
    # under `accelerate launch` each of N processes trains train_batch_size samples of one global batch
    processes = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    batch = t.train_batch_size * processes
    spec, folder_problems = spec_from_config(config.dataset, batch, default_resolution, processes)
    return make_plan(scan(spec, folder_problems), spec, batch_size=batch, max_train_epochs=t.max_train_epochs,
                     max_train_steps=t.max_train_steps, gradient_accumulation_steps=t.gradient_accumulation_steps,
                     steps_multiple=steps_multiple, seed=seed if seed is not None else t.seed)


def steps_multiple(family: str | None) -> int:
    # SDXL's UNet takes sizes in steps of 32 (sd-scripts allows bucket_reso_steps 32 there)
    return 32 if family == "sdxl" else 64


def plan_on_host(config: TrainConfig, host: Host) -> DatasetPlan:
    """The plan the tab shows before Start: the same folder guard and bucket steps as the run."""
    guard_config(config, host.access())  # the plan lists the folder's files
    return plan_dataset(config, host.model_resolution(), steps_multiple(host.model_family()))


def build_trainer(config: TrainConfig, adapter: ModelAdapter, warn=lambda msg: print(msg, file=sys.stderr), sample_fn=None) -> Trainer:
    seed = config.training.seed if config.training.seed is not None else random.randint(0, 2**31 - 1)
    plan = plan_dataset(config, adapter.info.resolution, steps_multiple(adapter.info.family), seed)
    d = config.dataset
    cache = LatentCache(module_fingerprint(adapter.vae), to_disk=d.cache_latents_to_disk, warn=warn) if (d.cache_latents or d.cache_latents_to_disk) else None
    notes: list[str] = []
    data = TrainingData(plan, seed, cache, workers=0 if cache else image_threads(d.max_data_loader_n_workers, notes))
    trainer = Trainer(config, adapter, build_network(config, adapter, seed), data, sample_fn=sample_fn)
    trainer.notes += notes
    return trainer


def image_threads(asked: int, notes: list[str]) -> int:
    """Threads for max_data_loader_n_workers: at most one per CPU core (more only wait for one)."""
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise UserError(msg("max_data_loader_n_workers must be a whole number, 0 or more (0: images load in the training thread)"))
    cores = os.cpu_count() or 1
    if asked > cores:
        notes.append(msg("max_data_loader_n_workers {asked}: {threads} threads make the images ahead of each step, "
                         "one per CPU core of this machine", asked=asked, threads=cores))
        return cores
    return asked


def preview_plan(sample_fn) -> list:
    """The previews a sample_fn renders at each sample event, for the estimate (its `prompts`)."""
    from lora_train.train.overheads import Preview

    return [Preview(p.steps, p.width, p.height, p.scale) for p in getattr(sample_fn, "prompts", None) or []]


def prepare_estimate(config: TrainConfig, adapter: ModelAdapter, cache_dir=None, calibrate: bool = False, sample_fn=None):
    """Before `build_trainer`: the run's estimate and the lines that show it. A cached estimate is
    always used; calibration steps run when `calibrate` asks or max_train_minutes needs them, and
    max_train_minutes then sets the epochs in `config`. `sample_fn`: the run's previews, priced in.
    Returns (estimate or None, plan, lines)."""
    from lora_train.train import estimate as est

    seed = config.training.seed or 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would time itself, and could fit other epochs
        plan = plan_dataset(config, adapter.info.resolution, steps_multiple(adapter.info.family), seed)
        asked = calibrate or config.training.max_train_minutes is not None
        return None, plan, [msg("the estimate and max_train_minutes are not used under accelerate launch (one process per device)")] if asked else []
    plan = plan_dataset(config, adapter.info.resolution, steps_multiple(adapter.info.family), seed)
    budget = config.training.max_train_minutes
    result = est.estimate(config, adapter, plan, lambda: build_network(config, adapter, seed), cache_dir or est.default_cache_dir(),
                          run_steps=calibrate or budget is not None, previews=preview_plan(sample_fn))
    if result is None:
        return None, plan, []
    lines = []
    if budget is not None:
        lines.append(est.apply_budget(config, result, plan))
        plan = plan_dataset(config, adapter.info.resolution, steps_multiple(adapter.info.family), seed)
    return result, plan, est.estimate_lines(config, result, plan) + lines


def select_targets(config: TrainConfig, kind, lora_targets, norm_targets, can_train_text_encoder: bool) -> list:
    """The modules a run trains: `lora_targets(conv)` lists the model's Linear/conv targets,
    `norm_targets()` its norm layers (for train_norm). Shared with `train --dry-run`, which lists
    them from a meta-device model."""
    n = config.network
    if kind.is_lycoris:
        # LyCORIS trains the convs its preset names
        targets = preset_targets(lora_targets(True), kind.preset)
        if kind.train_norm:
            targets += preset_targets(norm_targets(), kind.preset)
    else:
        targets = lora_targets(bool(n.conv_dim or n.conv_block_dims))
    if n.network_train_unet_only or not can_train_text_encoder:
        # sd-scripts leaves the text-encoder modules out of a UNet-only file
        targets = [t for t in targets if t.name.startswith("lora_unet_")]
    elif n.network_train_text_encoder_only:
        targets = [t for t in targets if not t.name.startswith("lora_unet_")]
    return targets


def build_network(config: TrainConfig, adapter: ModelAdapter, seed: int) -> LoRANetwork:
    kind = network_kind(config.network)

    def norms():
        return sdxl_unet_norm_targets(adapter.unet) if adapter.info.family == "sdxl" else ldm_unet_norm_targets(adapter.unet)

    targets = select_targets(config, kind, lambda conv: adapter.lora_targets(conv=conv), norms, adapter.can_train_text_encoder())
    return network_for_targets(config, kind, targets, seed)


def network_for_targets(config: TrainConfig, kind, targets: list, seed: int) -> LoRANetwork:
    n = config.network
    conv_dim, conv_alpha = n.conv_dim, n.conv_alpha if n.conv_alpha is not None else 1.0
    if kind.is_lycoris and conv_dim is None:
        # LyCORIS: conv_dim / conv_alpha = network_dim / network_alpha unless set
        conv_dim, conv_alpha = n.network_dim or 4, n.conv_alpha if n.conv_alpha is not None else n.network_alpha
    if n.network_weights and n.dim_from_weights:
        # sd-scripts' dim_from_weights: every module's rank and alpha come from the file
        network = network_from_file(n.network_weights, targets)
    else:
        weights = load_lora(n.network_weights)[0] if n.network_weights else None
        lr_weights = LrWeights(n.down_lr_weight, n.mid_lr_weight, n.up_lr_weight, n.block_lr_zero_threshold)
        try:
            network = LoRANetwork(
                targets, n.network_dim or 4, n.network_alpha, conv_dim, conv_alpha, seed=seed,
                block_dims=n.block_dims, block_alphas=n.block_alphas, conv_block_dims=n.conv_block_dims,
                conv_block_alphas=n.conv_block_alphas, dropout=n.network_dropout, rank_dropout=n.rank_dropout,
                module_dropout=n.module_dropout, lr_weights=lr_weights if lr_weights.active else None,
                kind=None if kind.is_default else kind,
            )
        except (TypeError, ValueError) as e:  # an option or size the algorithm cannot take (BOFT on 320 channels ...)
            raise UserError(msg("network_args algo={algo}: {reason}", algo=kind.algo, reason=e)) from e
        if weights is not None:
            try:
                network.load_kohya_state_dict(weights, strict=False)
            except KeyError as e:
                raise UserError(msg("network_weights '{path}': {reason}", path=n.network_weights, reason=e)) from e
    network.set_dropout(n.network_dropout, n.rank_dropout, n.module_dropout)  # also for a network rebuilt from a file
    return network
