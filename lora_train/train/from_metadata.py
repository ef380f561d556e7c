"""Rebuild a training config from a LoRA's `ss_*` metadata (kohya_ss #1977 asks for this).

sd-scripts stringifies every value ("None", "True", "(512, 512)", JSON for the dicts), so each key
is parsed back by the type of the config field it maps to. What the metadata cannot say (where
the images were) comes back as notes.
"""

from __future__ import annotations

import ast
import json
import re

from lora_train.errors import UserError, msg
from lora_train.train.config import NETWORK_ARG_ALIASES, NETWORK_ARGS, TrainConfig
from lora_train.train.optimizers import KNOWN_NAMES

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


# sd-scripts' per-subset options (ss_datasets) that are config keys here
SUBSET_KEYS = ("color_aug", "flip_aug", "random_crop", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
               "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix")
# ss_* keys read another way, or that say nothing a config could use
SPECIAL = {"ss_resolution", "ss_network_args", "ss_optimizer", "ss_lr_scheduler", "ss_output_name", "ss_sd_model_name",
           "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_datasets", "ss_v2", "ss_text_encoder_lr"}


def _value(text: str):
    if text in ("None", ""):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _optimizer_type(path: str, args: list[str]) -> str:
    """sd-scripts' optimizer_type for the class its ss_optimizer names ("bitsandbytes.optim.adamw.AdamW8bit" ->
    AdamW8bit); a class it has no name for stays a full path, which sd-scripts' optimizer_type also takes."""
    cls = path.rsplit(".", 1)[-1]
    nesterov = any(a.replace(" ", "").lower() == "nesterov=true" for a in args)
    if cls in ("SGD", "SGD8bit") and nesterov:  # sd-scripts' SGDNesterov is SGD(nesterov=True)
        return "SGDNesterov" if cls == "SGD" else "SGDNesterov8bit"
    by_lower = {n.lower(): n for n in KNOWN_NAMES}
    if cls.lower() in by_lower:
        return by_lower[cls.lower()]
    return cls if path.startswith("torch.optim.") else path


def _network_args(text: str, notes: list[str]) -> list[str]:
    try:
        args = json.loads(text)
    except ValueError:
        notes.append(msg("ss_network_args is not JSON: {args}", args=text))
        return []
    if not isinstance(args, dict):
        notes.append(msg("ss_network_args is not JSON: {args}", args=text))
        return []
    known = set(NETWORK_ARGS) | set(NETWORK_ARG_ALIASES) | {"network_dropout"}
    left = [f"{k}={v}" for k, v in args.items() if k not in known]
    if left:
        notes.append(msg("ss_network_args: LoRA Train has no network argument {args}; left out", args=", ".join(left)))
    return [f"{k}={v}" for k, v in args.items() if k in known]


def _datasets(text: str, values: dict, notes: list[str]) -> None:
    """sd-scripts' ss_datasets (a run with dataset_config): the first dataset's size and buckets, the
    subset options all subsets share, and one note line per subset folder."""
    try:
        datasets = json.loads(text)
    except ValueError:
        notes.append(msg("ss_datasets is not JSON"))
        return
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        return
    first = datasets[0]
    if len(datasets) > 1:
        notes.append(msg("ss_datasets: the run had {count} datasets; the config takes the first one's size and buckets "
                         "(write a dataset_config for the others)", count=len(datasets)))
    res = first.get("resolution")
    if isinstance(res, (list, tuple)) and len(res) == 2:
        values["resolution"] = f"{res[0]},{res[1]}"
    for ours, theirs in (("train_batch_size", "batch_size_per_device"), ("enable_bucket", "enable_bucket"),
                         ("min_bucket_reso", "min_bucket_reso"), ("max_bucket_reso", "max_bucket_reso")):
        if first.get(theirs) is not None:
            values[ours] = first[theirs]
    subsets = [s for d in datasets for s in d.get("subsets", []) if isinstance(s, dict)]
    train = [s for s in subsets if not s.get("is_reg")] or subsets
    for key in SUBSET_KEYS:
        seen = {json.dumps(s.get(key)) for s in train if key in s}
        if len(seen) == 1 and train[0].get(key) is not None:
            values[key] = train[0][key]
        elif len(seen) > 1:
            notes.append(msg("ss_datasets: the subsets differ in {key}; set it per folder in a dataset_config", key=key))
    lines = []
    for s in subsets:
        found = {"folder": s.get("image_dir") or s.get("metadata_file") or "?", "count": s.get("img_count"), "repeats": s.get("num_repeats")}
        reg = s.get("is_reg")
        lines.append("  " + (msg("{folder}: {count} regularization images, {repeats} repeats", **found) if reg
                             else msg("{folder}: {count} images, {repeats} repeats", **found)))
    if lines:
        notes.append("\n".join([msg("dataset: the images were in these folders; set train_data_dir to their parent:")] + lines))


def config_from_metadata(md: dict[str, str]) -> tuple[TrainConfig, list[str]]:
    """A config from the ss_* metadata sd-scripts, kohya_ss and LoRA Train write. A value that does not fit its key
    is a note, never the end of the rebuild."""
    config, notes = TrainConfig(), []
    known = config.key_index()
    values: dict = {}
    for ss, key in DIRECT.items():
        if ss in md and _value(md[ss]) is not None:
            values[key] = _value(md[ss])
    for ss, text in md.items():  # ss_<config key>: what sd-scripts records of newer options (max_token_length, ...)
        key = ss[3:]
        if ss.startswith("ss_") and ss not in DIRECT and ss not in SPECIAL and key in known and _value(text) is not None:
            values[key] = _value(text)
    te_lr = _value(md.get("ss_text_encoder_lr", "None"))
    if isinstance(te_lr, (list, tuple)):  # SDXL: one rate per text encoder
        if len(set(te_lr)) > 1:
            notes.append(msg("ss_text_encoder_lr: one rate per text encoder ({rates}); the config takes the first", rates=te_lr))
        te_lr = te_lr[0] if te_lr else None
    if te_lr is not None:
        values["text_encoder_lr"] = te_lr
    if values.get("text_encoder_lr") == 0:
        values.pop("text_encoder_lr")
        values["network_train_unet_only"] = True
    if values.get("unet_lr") == 0:
        values.pop("unet_lr")
        values["network_train_text_encoder_only"] = True
    res = _value(md.get("ss_resolution", "None"))
    if isinstance(res, int):
        res = (res, res)
    if isinstance(res, (tuple, list)) and len(res) == 2:
        values["resolution"] = f"{res[0]},{res[1]}"
    if md.get("ss_datasets", "None") != "None":
        _datasets(md["ss_datasets"], values, notes)
    args = md.get("ss_network_args", "None")
    if args not in ("None", ""):
        values["network_args"] = _network_args(args, notes)
    opt = md.get("ss_optimizer")
    if opt and opt != "None":
        m = re.match(r"^([\w.]+?)(?:\((.*)\))?$", opt)
        if m:
            opt_args = [a.strip() for a in re.split(r",(?![^()\[\]]*[)\]])", m.group(2) or "") if a.strip()]
            values["optimizer_type"] = _optimizer_type(m.group(1), opt_args)
            if opt_args:
                values["optimizer_args"] = opt_args
    sched = md.get("ss_lr_scheduler")
    if sched and sched != "None":
        values["lr_scheduler"] = sched.split(":")[0]
    if md.get("ss_output_name") and md["ss_output_name"] != "None":
        values["output_name"] = re.sub(r"-(\d{6}|step\d{8}|interrupted)$", "", md["ss_output_name"])
    v2 = md.get("ss_v2") == "True" or md.get("ss_base_model_version", "").startswith("sd_v2")
    if v2:
        values["v2"] = True
        if md.get("modelspec.prediction_type") == "v" or md.get("ss_base_model_version") == "sd_v2_768_v":
            values["v_parameterization"] = True
    items = [(k, v) for k, v in values.items() if k != "network_args"] + [("network_args", [a]) for a in values.get("network_args", [])]
    for key, value in items:
        if key not in known and key != "network_args":
            if key in ("v2", "v_parameterization"):
                notes.append(msg("base model: {what}; LoRA Train reads it from the checkpoint's .yaml", what=key))
            continue
        try:  # one key at a time: a value that does not fit costs its own key only
            config.update({key: value}, source="metadata")
        except UserError as e:
            notes.append(str(e))
    if md.get("ss_sd_model_name") and md["ss_sd_model_name"] != "None":
        config.model.pretrained_model_name_or_path = md["ss_sd_model_name"]
        notes.append(msg("base model: only its file name is recorded ({name}); set the full path", name=md["ss_sd_model_name"]))
    try:
        dirs = json.loads(md.get("ss_dataset_dirs", "null"))
    except ValueError:
        dirs = None
    if isinstance(dirs, dict) and dirs and "ss_datasets" not in md:
        # one folder a line: a list inside one line could not be translated item by item
        notes.append("\n".join([msg("dataset: the images were in these folders; set train_data_dir to their parent:")] + [
            "  " + msg("{folder}: {count} images, {repeats} repeats", folder=name, count=d.get("img_count"), repeats=d.get("n_repeats"))
            for name, d in dirs.items()]))
    return config, notes
