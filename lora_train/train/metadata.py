"""kohya `ss_*` and `modelspec.*` metadata for a saved LoRA. Every value is a string, as sd-scripts
writes them; unset values are the string "None", also as sd-scripts does, except `ss_network_args`,
which sd-scripts leaves out when there are none."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import mimetypes
import os
import time

import torch

from lora_train import __version__
from lora_train.dataset.plan import DatasetPlan
from lora_train.dataset.scan import Scan
from lora_train.errors import UserError, msg
from lora_train.model.adapter import ModelInfo
from lora_train.network.network import LoRANetwork
from lora_train.train.config import NETWORK_ARGS, NetworkConfig, TrainConfig


def _s(value) -> str:
    return str(value)


def model_hashes(path: str | None) -> tuple[str, str]:
    """(old 8-hex A1111 model hash, full sha256) of the base checkpoint file, as sd-scripts records."""
    if not path or not os.path.isfile(path):
        return "None", "None"
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return legacy, sha.hexdigest()


def training_metadata(
    config: TrainConfig,
    info: ModelInfo,
    network: LoRANetwork,
    plan: DatasetPlan,
    scan: Scan,
    *,
    session_id: int,
    started_at: float,
    seed: int,
    train_unet: bool,
    train_te: bool,
    optimizer: str = "torch.optim.adamw.AdamW",
    lr_scheduler: str | None = None,
) -> dict[str, str]:
    c = config
    d, t = c.dataset, c.training
    lr = c.optimizer.learning_rate
    block = plan.blocks[0].block
    resolution = block.resolution or (512, 512)
    bucket_info = {
        "buckets": {str(i): {"resolution": list(row["resolution"]), "count": row["images_x_repeats"]}
                    for i, row in enumerate(r for b in plan.blocks for r in b.report()["buckets"])},
        "mean_img_ar_error": sum(b.report()["mean_ar_error"] * len(b.buckets) for b in plan.blocks) / max(1, len(plan.items)),
    }
    defaults = NetworkConfig()
    network_args = {k: _s(getattr(c.network, k)) for k in NETWORK_ARGS
                    if getattr(c.network, k) is not None and getattr(c.network, k) != getattr(defaults, k)}
    if c.network.conv_dim:
        network_args["conv_alpha"] = _s(c.network.conv_alpha if c.network.conv_alpha is not None else 1)
    kind = getattr(network, "kind", None)
    if kind is not None and kind.is_lycoris:
        # as sd-scripts records LyCORIS' args: algo always, and the conv rank LyCORIS derived when none was given
        network_args.update(kind.network_args())
        trains_convs = any(isinstance(m.org, torch.nn.Conv2d) and tuple(m.org.kernel_size) != (1, 1) for m in network.lora_modules.values())
        if network.conv_dim and trains_convs:  # the preset's 3x3 convs, at the rank LyCORIS gave them
            network_args.setdefault("conv_dim", _s(network.conv_dim))
            network_args["conv_alpha"] = _s(network.conv_alpha)
    model_hash, new_model_hash = model_hashes(info.path)
    vae_hash, new_vae_hash = model_hashes(info.vae)
    md = {
        "ss_session_id": _s(session_id),
        "ss_training_started_at": _s(started_at),
        "ss_output_name": c.saving.output_name,
        "ss_learning_rate": _s(lr),
        "ss_text_encoder_lr": _s(c.optimizer.text_encoder_lr),
        "ss_unet_lr": _s(c.optimizer.unet_lr),
        "ss_num_train_images": _s(plan.train_samples),
        "ss_num_reg_images": _s(plan.reg_samples),
        "ss_num_batches_per_epoch": _s(plan.steps_per_epoch),
        "ss_num_epochs": _s(plan.epochs),
        "ss_gradient_checkpointing": _s(c.training.gradient_checkpointing),
        "ss_gradient_accumulation_steps": _s(c.training.gradient_accumulation_steps),
        "ss_max_train_steps": _s(plan.total_steps),
        "ss_lr_warmup_steps": _s(c.optimizer.lr_warmup_steps),
        "ss_lr_scheduler": lr_scheduler or c.optimizer.lr_scheduler,
        "ss_network_module": c.network.network_module,
        "ss_network_dim": _s(network.dim),
        "ss_network_alpha": _s(network.alpha if network.alpha else network.dim),
        "ss_network_dropout": _s(c.network.network_dropout),
        "ss_mixed_precision": c.training.mixed_precision,
        "ss_min_timestep": _s(t.min_timestep),
        "ss_max_timestep": _s(t.max_timestep),
        "ss_full_fp16": "False",
        "ss_v2": _s(info.family == "sd2"),
        "ss_base_model_version": info.base_model_version,
        "ss_clip_skip": _s(c.model.clip_skip),
        "ss_max_token_length": _s(c.training.max_token_length),
        "ss_cache_latents": _s(d.cache_latents or d.cache_latents_to_disk),
        "ss_seed": _s(seed),
        "ss_lowram": "False",
        "ss_noise_offset": _s(t.noise_offset),
        "ss_multires_noise_iterations": _s(t.multires_noise_iterations),
        "ss_multires_noise_discount": _s(t.multires_noise_discount),
        "ss_adaptive_noise_scale": _s(t.adaptive_noise_scale),
        "ss_zero_terminal_snr": _s(t.zero_terminal_snr),
        "ss_training_comment": _s(c.saving.training_comment),
        "ss_sd_scripts_commit_hash": f"lora-train-{__version__}",
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": _s(c.optimizer.max_grad_norm),
        "ss_caption_dropout_rate": _s(d.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": _s(d.caption_dropout_every_n_epochs),
        "ss_caption_tag_dropout_rate": _s(d.caption_tag_dropout_rate),
        "ss_face_crop_aug_range": "None",
        "ss_prior_loss_weight": _s(c.training.prior_loss_weight),
        "ss_min_snr_gamma": _s(t.min_snr_gamma),
        "ss_scale_weight_norms": _s(t.scale_weight_norms),
        "ss_ip_noise_gamma": _s(t.ip_noise_gamma),
        "ss_debiased_estimation": _s(t.debiased_estimation_loss),
        "ss_noise_offset_random_strength": _s(t.noise_offset_random_strength),
        "ss_ip_noise_gamma_random_strength": _s(t.ip_noise_gamma_random_strength),
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_scale": _s(t.huber_scale),
        "ss_huber_c": _s(t.huber_c),
        # as sd-scripts records its validation options
        "ss_num_validation_images": _s(len(plan.validation)),
        "ss_validation_seed": _s(d.validation_seed),
        "ss_validation_split": _s(d.validation_split),
        "ss_max_validation_steps": _s(t.max_validation_steps),
        "ss_validate_every_n_epochs": _s(t.validate_every_n_epochs),
        "ss_validate_every_n_steps": _s(t.validate_every_n_steps),
        "ss_fp8_base": "False",
        "ss_fp8_base_unet": "False",
        # no --dataset_config: the flat dataset keys
        "ss_batch_size_per_device": _s(c.training.train_batch_size),
        "ss_total_batch_size": _s(c.training.train_batch_size * max(1, int(os.environ.get("WORLD_SIZE", "1")))),
        "ss_resolution": _s(tuple(resolution)),
        "ss_color_aug": _s(d.color_aug),
        "ss_flip_aug": _s(d.flip_aug),
        "ss_random_crop": _s(d.random_crop),
        "ss_shuffle_caption": _s(d.shuffle_caption),
        "ss_enable_bucket": _s(block.enable_bucket),
        "ss_bucket_no_upscale": _s(block.bucket_no_upscale),
        "ss_min_bucket_reso": _s(block.min_bucket_reso if block.enable_bucket else None),
        "ss_max_bucket_reso": _s(block.max_bucket_reso if block.enable_bucket else None),
        "ss_keep_tokens": _s(d.keep_tokens),
        "ss_dataset_dirs": json.dumps(scan.dataset_dirs(), ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(scan.dataset_dirs(reg=True), ensure_ascii=False),
        "ss_tag_frequency": json.dumps(scan.tag_frequency(), ensure_ascii=False),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_sd_model_name": _s(info.name),
        "ss_sd_model_hash": model_hash,
        "ss_new_sd_model_hash": new_model_hash,
        "ss_vae_name": _s(info.vae and os.path.basename(info.vae)),
        "ss_vae_hash": vae_hash,
        "ss_new_vae_hash": new_vae_hash,
    }
    if network_args:  # sd-scripts leaves the key out when there are none (older LoRA Train files have "None")
        md["ss_network_args"] = json.dumps(network_args)
    if not train_te:
        md["ss_text_encoder_lr"] = "0"  # how kohya marks a UNet-only run
    if not train_unet:
        md["ss_unet_lr"] = "0"
    date = datetime.datetime.fromtimestamp(started_at).isoformat(timespec="seconds")
    md.update(
        {
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": info.modelspec_architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if info.family == "sdxl" else "diffusers",
            "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
            "modelspec.date": date,
            "modelspec.implementation_version": f"lora-train/{__version__}",
            "modelspec.prediction_type": info.prediction_type,
        }
    )
    if t.min_timestep is not None or t.max_timestep is not None:  # as sd-scripts: the range trained on
        md["modelspec.timestep_range"] = f"{t.min_timestep if t.min_timestep is not None else 0},{t.max_timestep if t.max_timestep is not None else 1000}"
    if c.model.clip_skip:
        md["modelspec.encoder_layer"] = _s(c.model.clip_skip)
    md.update(user_modelspec(c))
    return md


# config key -> modelspec.* key, as sd-scripts' --metadata_* options write them
USER_MODELSPEC = {f"metadata_{name}": f"modelspec.{name}" for name in (
    "title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase",
    "preprocessor", "is_negative_embedding")}

# what sd-scripts keeps with no_metadata: the keys loaders and metadata filters need
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def user_modelspec(config: TrainConfig) -> dict[str, str]:
    """The metadata_* keys the user set; modelspec.title is the output name when metadata_title is unset."""
    s = config.saving
    md = {spec: str(getattr(s, key)) for key, spec in USER_MODELSPEC.items() if getattr(s, key) is not None}
    md.setdefault("modelspec.title", s.output_name)
    if "modelspec.thumbnail" in md and not md["modelspec.thumbnail"].startswith("data:"):
        md["modelspec.thumbnail"] = _data_url(md["modelspec.thumbnail"])
    return md


def _data_url(path: str) -> str:
    """An image file as a data: URL, as sd-scripts embeds metadata_thumbnail."""
    if not os.path.isfile(path):
        raise UserError(msg("metadata_thumbnail: '{path}' does not exist (give an image file or a data: URL)", path=path))
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def save_time_metadata(metadata: dict[str, str], epoch: int, step: int, no_metadata: bool = False) -> dict[str, str]:
    """What differs between the saves of one run. ss_output_name and modelspec.title stay the run's
    name in every file (epoch, step and interrupted saves alike), as sd-scripts writes them: tools
    group a run's epochs by it. With no_metadata only MINIMUM_KEYS and the modelspec.* keys are kept,
    as sd-scripts does."""
    if no_metadata:
        return {k: v for k, v in metadata.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    out = dict(metadata)
    out["ss_training_finished_at"] = _s(time.time())
    out["ss_steps"] = _s(step)
    out["ss_epoch"] = _s(epoch)
    return out
