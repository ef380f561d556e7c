"""Rebuild a training config from a LoRA's `ss_*` metadata (kohya_ss #1977 asks for this).

sd-scripts stringifies every value ("None", "True", "(512, 512)", JSON for the dicts), so each key
is parsed back by the type of the config field it maps to. What the metadata cannot say (where
the images were) comes back as notes.
"""

from __future__ import annotations

import ast
import json
import re

from lora_train.errors import msg
from lora_train.train.config import TrainConfig

# ss_* key -> config key, where the names differ or the value needs no special parsing
DIRECT = {
    "ss_learning_rate": "learning_rate", "ss_unet_lr": "unet_lr", "ss_text_encoder_lr": "text_encoder_lr",
    "ss_network_module": "network_module", "ss_network_dim": "network_dim", "ss_network_alpha": "network_alpha",
    "ss_network_dropout": "network_dropout", "ss_max_train_steps": "max_train_steps", "ss_num_epochs": "max_train_epochs",
    "ss_lr_warmup_steps": "lr_warmup_steps", "ss_seed": "seed",
    "ss_clip_skip": "clip_skip", "ss_max_token_length": "max_token_length", "ss_batch_size_per_device": "train_batch_size",
    "ss_gradient_accumulation_steps": "gradient_accumulation_steps", "ss_gradient_checkpointing": "gradient_checkpointing",
    "ss_mixed_precision": "mixed_precision", "ss_noise_offset": "noise_offset",
    "ss_multires_noise_iterations": "multires_noise_iterations", "ss_multires_noise_discount": "multires_noise_discount",
    "ss_adaptive_noise_scale": "adaptive_noise_scale", "ss_zero_terminal_snr": "zero_terminal_snr",
    "ss_min_snr_gamma": "min_snr_gamma", "ss_ip_noise_gamma": "ip_noise_gamma", "ss_debiased_estimation": "debiased_estimation_loss",
    "ss_noise_offset_random_strength": "noise_offset_random_strength", "ss_ip_noise_gamma_random_strength": "ip_noise_gamma_random_strength",
    "ss_loss_type": "loss_type", "ss_huber_schedule": "huber_schedule", "ss_huber_c": "huber_c", "ss_huber_scale": "huber_scale",
    "ss_prior_loss_weight": "prior_loss_weight", "ss_caption_dropout_rate": "caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs", "ss_caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "ss_flip_aug": "flip_aug", "ss_color_aug": "color_aug", "ss_random_crop": "random_crop", "ss_shuffle_caption": "shuffle_caption",
    "ss_keep_tokens": "keep_tokens", "ss_enable_bucket": "enable_bucket", "ss_bucket_no_upscale": "bucket_no_upscale",
    "ss_min_bucket_reso": "min_bucket_reso", "ss_max_bucket_reso": "max_bucket_reso", "ss_cache_latents": "cache_latents",
    "ss_max_grad_norm": "max_grad_norm", "ss_training_comment": "training_comment", "ss_min_timestep": "min_timestep",
    "ss_max_timestep": "max_timestep",
}


def _value(text: str):
    if text in ("None", ""):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_from_metadata(md: dict[str, str]) -> tuple[TrainConfig, list[str]]:
    config, notes = TrainConfig(), []
    values: dict = {}
    for ss, key in DIRECT.items():
        if ss in md and _value(md[ss]) is not None:
            values[key] = _value(md[ss])
    if values.get("text_encoder_lr") == 0:
        values.pop("text_encoder_lr")
        values["network_train_unet_only"] = True
    if values.get("unet_lr") == 0:
        values.pop("unet_lr")
        values["network_train_text_encoder_only"] = True
    res = _value(md.get("ss_resolution", "None"))
    if isinstance(res, (tuple, list)) and len(res) == 2:
        values["resolution"] = f"{res[0]},{res[1]}"
    args = md.get("ss_network_args", "None")
    if args not in ("None", ""):
        try:
            values["network_args"] = [f"{k}={v}" for k, v in json.loads(args).items()]
        except ValueError:
            notes.append(msg("ss_network_args is not JSON: {args}", args=args))
    opt = md.get("ss_optimizer")
    if opt:
        m = re.match(r"^([\w.]+?)(?:\((.*)\))?$", opt)
        if m:
            cls = m.group(1).rsplit(".", 1)[-1]
            values["optimizer_type"] = cls if m.group(1).startswith("torch.optim.") else m.group(1)
            if m.group(2):
                values["optimizer_args"] = [a.strip() for a in re.split(r",(?![^()]*\))", m.group(2)) if a.strip()]
    sched = md.get("ss_lr_scheduler")
    if sched:
        values["lr_scheduler"] = sched.split(":")[0]
    if md.get("ss_output_name"):
        values["output_name"] = re.sub(r"-(\d{6}|step\d{8}|interrupted)$", "", md["ss_output_name"])
    known = config.key_index()
    config.update({k: v for k, v in values.items() if k in known or k == "network_args"}, source="metadata")
    if md.get("ss_sd_model_name"):
        config.model.pretrained_model_name_or_path = md["ss_sd_model_name"]
        notes.append(msg("base model: only its file name is recorded ({name}); set the full path", name=md["ss_sd_model_name"]))
    try:
        dirs = json.loads(md.get("ss_dataset_dirs", "null"))
    except ValueError:
        dirs = None
    if isinstance(dirs, dict) and dirs:
        # one folder a line: a list inside one line could not be translated item by item
        notes.append("\n".join([msg("dataset: the images were in these folders; set train_data_dir to their parent:")] + [
            "  " + msg("{folder}: {count} images, {repeats} repeats", folder=name, count=d.get("img_count"), repeats=d.get("n_repeats"))
            for name, d in dirs.items()]))
    return config, notes
