"""Every engine knob as a form field, labelled with its sd-scripts name, and the way back from the
form's values to a TrainConfig. The fields come from the config tree itself, so a new knob in the
engine shows up in the Expert view without touching the UI."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Optional

from lora_train.errors import UserError, msg
from lora_train.train.config import TrainConfig, parse_set_value

# Shown in Basic mode, in this order. Everything else is Expert.
BASIC = (
    "train_data_dir", "reg_data_dir", "output_name", "max_train_epochs", "train_batch_size", "network_dim",
    "network_alpha", "unet_lr", "text_encoder_lr", "resolution", "save_every_n_epochs",
)

SECTION_TITLES = {
    "model": "Model", "network": "Network", "optimizer": "Optimizer and learning rate", "training": "Training, noise and loss",
    "dataset": "Dataset, captions and buckets", "saving": "Saving", "logging": "Logging", "sampling": "Preview samples",
}

# The UI owns these: the host provides the model, the run manager the folders.
HIDDEN = {"pretrained_model_name_or_path", "output_dir", "resume", "save_model_as", "sample_prompts", "dataset_config",
          "logging_dir", "log_with", "log_prefix"}


def _choices() -> dict[str, list[str]]:
    from lora_train.sample.samplers import SAMPLER_LABELS
    from lora_train.train.loss import HUBER_SCHEDULES, LOSS_TYPES
    from lora_train.train.optimizers import KNOWN_NAMES
    from lora_train.train.schedulers import SCHEDULERS

    from lora_train.network.algorithms import LYCORIS_ALGOS
    from lora_train.network.kind import LYCORIS, SD_SCRIPTS
    from lora_train.network.targets import PRESETS

    return {
        "network_module": [SD_SCRIPTS[0], LYCORIS], "algo": ["", *LYCORIS_ALGOS], "preset": ["", *PRESETS],
        "optimizer_type": list(KNOWN_NAMES), "lr_scheduler": list(SCHEDULERS), "mixed_precision": ["no", "fp16", "bf16"],
        "save_precision": ["", "float", "fp16", "bf16"], "loss_type": list(LOSS_TYPES), "huber_schedule": list(HUBER_SCHEDULES),
        "sample_sampler": list(SAMPLER_LABELS),
    }


# One line each, as sd-scripts' --help and the kohya GUIs explain them.
HELP = {
    "train_data_dir": "Folder with kohya subfolders like 10_name (10 repeats) holding images and .txt captions",
    "reg_data_dir": "Optional regularization folder, same layout",
    "output_name": "File name of the LoRA (a number is added if it exists)",
    "max_train_epochs": "Epochs to train; overrides max_train_steps",
    "max_train_steps": "Steps to train when max_train_epochs is empty",
    "max_train_minutes": "Time budget in minutes: the epochs are lowered to what the estimate fits in it (never raised)",
    "train_batch_size": "Images per step",
    "network_dim": "Rank of the LoRA (size and capacity)",
    "network_alpha": "Scales the LoRA by alpha/dim; lower = gentler",
    "conv_dim": "Rank for 3x3 convolutions (LoCon); empty = linear layers only",
    "conv_alpha": "Alpha for the convolution layers",
    "network_module": "networks.lora (sd-scripts: LoRA, LoCon) or lycoris.kohya (LyCORIS: the algo below)",
    "algo": "LyCORIS algorithm: lora (LoCon), loha, lokr, ia3, full, glora, diag-oft, boft",
    "preset": "LyCORIS: which layers to train; empty = full (attention, MLP and 3x3 convolutions)",
    "dora_wd": "DoRA: also train each weight's magnitude (LyCORIS dora_wd)",
    "wd_on_output": "DoRA magnitude per output channel; off = per input channel, what A1111 v1.10 reads",
    "use_tucker": "LoHa / LoKr: Tucker decomposition for 3x3 convolutions",
    "factor": "LoKr: split factor of the Kronecker product; -1 = as even as possible",
    "decompose_both": "LoKr: low-rank in both Kronecker factors",
    "full_matrix": "LoKr: no low-rank decomposition at all",
    "constraint": "OFT: bound on the rotation; empty = none",
    "rescaled": "OFT: also train a scale per output channel",
    "train_on_input": "IA3: scale the inputs instead of the outputs",
    "learning_rate": "Default learning rate",
    "unet_lr": "Learning rate of the UNet LoRA",
    "text_encoder_lr": "Learning rate of the text-encoder LoRA",
    "network_train_unet_only": "Do not train the text encoder",
    "resolution": "Training size, '512' or 'width,height'",
    "save_every_n_epochs": "Save (and publish) a LoRA every N epochs",
    "optimizer_type": "AdamW, AdamW8bit (NVIDIA GPU), Lion, Prodigy, DAdaptAdam, Adafactor ...",
    "optimizer_args": "Extra optimizer arguments, e.g. weight_decay=0.01 betas=0.9,0.99",
    "lr_scheduler": "How the learning rate changes over the run",
    "lr_warmup_steps": "Warm-up steps, or a fraction of all steps when below 1",
    "noise_offset": "Adds offset noise (0.05-0.1) for darker darks and brighter brights",
    "multires_noise_iterations": "Multi-resolution (pyramid) noise iterations, e.g. 6",
    "min_snr_gamma": "Min-SNR weighting, 5 is typical",
    "shuffle_caption": "Shuffle comma-separated tags every step",
    "keep_tokens": "Keep the first N tags in place (the trigger word)",
    "enable_bucket": "Train on several aspect ratios",
    "mixed_precision": "fp16 / bf16 need a GPU",
    "gradient_checkpointing": "Less memory, slower steps",
    "cache_latents": "Encode images once before training",
    "seed": "Random seed; empty = random",
    "clip_skip": "Use the Nth last text-encoder layer (2 for anime models)",
    "caption_extension": "Caption file extension (.txt)",
    "flip_aug": "Also train on mirrored images",
    "save_state": "Also save optimizer state with every save (resumable)",
}


@dataclass
class Field:
    key: str
    section: str
    kind: str  # checkbox | dropdown | number | text
    default: Any
    choices: Optional[list[str]] = None
    value_type: Any = str  # the config's type under Optional: how a text field's content is read

    @property
    def basic(self) -> bool:
        return self.key in BASIC


def fields() -> list[Field]:
    config = TrainConfig()
    choices = _choices()
    out = []
    for key, (section, f, hint) in TrainConfig.key_index().items():
        if key in HIDDEN:
            continue
        default = config.get(key)
        optional = typing.get_origin(hint) is typing.Union
        value_type = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        if hint is bool:
            kind = "checkbox"
        elif key in choices:
            kind = "dropdown"
        elif hint in (int, float) and not optional:
            kind = "number"
        else:
            kind = "text"
        out.append(Field(key, section, kind, default, choices.get(key), value_type))
    order = {k: i for i, k in enumerate(BASIC)}
    return sorted(out, key=lambda f: (not f.basic, order.get(f.key, 0)))


def ui_value(field: Field, value: Any) -> Any:
    """A config value as its component shows it."""
    if field.kind == "checkbox":
        return bool(value)
    if field.kind == "dropdown":
        return "" if value is None else str(value)
    if field.kind == "number":
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def config_from_values(flds: list[Field], values: list[Any]) -> TrainConfig:
    """The form's values over the defaults. A bad value names its field."""
    config = TrainConfig()
    for f, value in zip(flds, values):
        if f.kind == "checkbox":
            config.set(f.key, bool(value), source="form")
            continue
        if f.kind == "number":
            if value is None or value == "":
                raise UserError(msg("{field}: a number is needed", field=f.key))
            config.set(f.key, value, source="form")
            continue
        text = "" if value is None else str(value).strip()
        if text == "":
            config.set(f.key, f.default, source="form")
        elif f.value_type is list:
            config.set(f.key, text.split(), source="form")
        elif f.value_type is str:
            config.set(f.key, text, source="form")  # never read as TOML: "512,768", "10_a" and "true" stay as typed
        else:
            config.set(f.key, parse_set_value(text), source="form")
    return config


def values_from_config(flds: list[Field], config: TrainConfig) -> list[Any]:
    return [ui_value(f, config.get(f.key)) for f in flds]
