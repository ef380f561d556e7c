"""A training job from a config: model, data, network and trainer put together.

Shared by the CLI and (later) the UI; the host decides where the model comes from.
"""

from __future__ import annotations

from lora_train.dataset.loader import FixedSizeData, parse_resolution
from lora_train.dataset.scan import scan_kohya_folder
from lora_train.errors import UserError
from lora_train.model.adapter import ModelAdapter
from lora_train.network.network import LoRANetwork
from lora_train.train.config import TrainConfig
from lora_train.train.loop import Trainer


def build_trainer(config: TrainConfig, adapter: ModelAdapter) -> Trainer:
    d = config.dataset
    if not d.train_data_dir:
        raise UserError("train_data_dir is not set: point it at a folder holding '<repeats>_<name>' subfolders")
    width, height = parse_resolution(d.resolution, adapter.info.resolution)
    data = FixedSizeData(scan_kohya_folder(d.train_data_dir, d.caption_extension), width, height)
    n = config.network
    dim = n.network_dim or 4
    conv_alpha = n.conv_alpha if n.conv_alpha is not None else 1.0
    seed = config.training.seed or 0
    targets = adapter.lora_targets(conv=bool(n.conv_dim))
    if n.network_train_unet_only or not adapter.can_train_text_encoder():
        # sd-scripts leaves the text-encoder modules out of a UNet-only file
        targets = [t for t in targets if t.name.startswith("lora_unet_")]
    elif n.network_train_text_encoder_only:
        targets = [t for t in targets if not t.name.startswith("lora_unet_")]
    network = LoRANetwork(targets, dim, n.network_alpha, n.conv_dim, conv_alpha, seed=seed)
    return Trainer(config, adapter, network, data)

