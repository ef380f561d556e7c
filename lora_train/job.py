"""A training job from a config: dataset plan, model, network and trainer put together.

Shared by the CLI and (later) the UI; the host decides where the model comes from.
"""

from __future__ import annotations

import random
import sys

from lora_train.dataset.cache import LatentCache, module_fingerprint
from lora_train.dataset.loader import TrainingData
from lora_train.dataset.plan import DatasetPlan, make_plan
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.model.adapter import ModelAdapter
from lora_train.network.network import LoRANetwork
from lora_train.train.config import TrainConfig
from lora_train.train.loop import Trainer


def plan_dataset(config: TrainConfig, default_resolution: int = 512, steps_multiple: int = 64) -> DatasetPlan:
    t = config.training
    spec, folder_problems = spec_from_config(config.dataset, t.train_batch_size, default_resolution)
    return make_plan(scan(spec, folder_problems), spec, batch_size=t.train_batch_size, max_train_epochs=t.max_train_epochs,
                     max_train_steps=t.max_train_steps, steps_multiple=steps_multiple)


def build_trainer(config: TrainConfig, adapter: ModelAdapter, warn=lambda msg: print(msg, file=sys.stderr)) -> Trainer:
    plan = plan_dataset(config, adapter.info.resolution)
    seed = config.training.seed if config.training.seed is not None else random.randint(0, 2**31 - 1)
    d = config.dataset
    cache = LatentCache(module_fingerprint(adapter.vae), to_disk=d.cache_latents_to_disk, warn=warn) if (d.cache_latents or d.cache_latents_to_disk) else None
    data = TrainingData(plan, seed, cache)
    n = config.network
    conv_alpha = n.conv_alpha if n.conv_alpha is not None else 1.0
    targets = adapter.lora_targets(conv=bool(n.conv_dim))
    if n.network_train_unet_only or not adapter.can_train_text_encoder():
        # sd-scripts leaves the text-encoder modules out of a UNet-only file
        targets = [t for t in targets if t.name.startswith("lora_unet_")]
    elif n.network_train_text_encoder_only:
        targets = [t for t in targets if not t.name.startswith("lora_unet_")]
    network = LoRANetwork(targets, n.network_dim or 4, n.network_alpha, n.conv_dim, conv_alpha, seed=seed)
    return Trainer(config, adapter, network, data)
