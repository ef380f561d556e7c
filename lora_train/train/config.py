"""The training config: one typed dataclass tree whose leaf names are sd-scripts' argument names.

TOML in: sd-scripts flattens one level of tables and ignores their names, so a flat kohya /
lora-scripts file and our sectioned file both load. TOML out: sectioned by our tree, which
sd-scripts reads back the same way. sd-scripts options that are not keys of the tree are read,
noted or refused by `compat`; other unknown keys are an error that names the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lora_train.dataset.spec import DatasetConfig
from lora_train.errors import UserError, close_match_hint, msg
from lora_train.tomlfile import parse_toml_value, read_toml, write_toml
from lora_train.train import compat
from lora_train.train.loss import LossOptions
from lora_train.train.noise import NoiseOptions


@dataclass
class ModelConfig:
    # no default: a run names its model (a file, or a built-in test model), never a silent stand-in
    pretrained_model_name_or_path: Optional[str] = None  # a file, a built-in model or a Hugging Face id
    clip_skip: Optional[int] = None
    # a checkpoint without its .yaml: SD2 (v2) and v-prediction (v_parameterization), as in sd-scripts
    v2: bool = False
    v_parameterization: bool = False
    vae: Optional[str] = None  # a VAE file (or Hugging Face id) in place of the checkpoint's own
    no_half_vae: bool = False  # a half-precision VAE encodes in float32


@dataclass
class NetworkConfig:
    network_module: str = "networks.lora"
    network_dim: Optional[int] = None  # sd-scripts: None means 4
    network_alpha: float = 1.0
    network_dropout: Optional[float] = None  # neuron dropout on the LoRA's down projection
    network_weights: Optional[str] = None  # start from this LoRA file
    dim_from_weights: bool = False
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    # In sd-scripts these travel in network_args ("conv_dim=8"); kohya_ss also writes them as keys.
    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    # 25 comma-separated values for SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 23 for SDXL (BASE, IN00-IN08,
    # MID00-MID02, OUT00-OUT08, OUT)
    block_dims: Optional[str] = None
    block_alphas: Optional[str] = None
    conv_block_dims: Optional[str] = None
    conv_block_alphas: Optional[str] = None
    down_lr_weight: Optional[str] = None  # 12 values (9 on SDXL) or a preset: sine, cosine, linear, reverse_linear, zeros (+offset)
    mid_lr_weight: Optional[float] = None
    up_lr_weight: Optional[str] = None
    block_lr_zero_threshold: float = 0.0
    # LyCORIS' network_args (network_module = "lycoris.kohya"), by its names; `network/kind.py` reads them
    algo: Optional[str] = None  # lora (LoCon), loha, lokr, ia3, full, glora, diag-oft, boft
    preset: Optional[str] = None  # which modules: full (LyCORIS' default), full-lin, attn-mlp, attn-only, ...
    dora_wd: bool = False  # DoRA: a trained magnitude per output (wd_on_output) or input
    wd_on_output: Optional[bool] = None  # ours: False (what A1111 v1.10 renders right); LyCORIS': True
    use_tucker: bool = False
    use_scalar: bool = False
    factor: int = -1  # LoKr
    decompose_both: bool = False  # LoKr
    full_matrix: bool = False  # LoKr
    unbalanced_factorization: bool = False  # LoKr
    constraint: Optional[float] = None  # OFT
    rescaled: bool = False  # OFT
    train_on_input: bool = False  # IA3
    rank_dropout_scale: bool = False
    bypass_mode: bool = False
    train_norm: bool = False  # LyCORIS: also train the norm layers of the blocks the preset names
    unit: Optional[int] = None  # DyLoRA (networks.dylora): ranks trained in steps of this; LyCORIS' algo=dylora calls it block_size
    # LoRA files added to the model for the run (sd-scripts merges them in before training); `train/base_weights.py`
    base_weights: list = field(default_factory=list)
    base_weights_multiplier: list = field(default_factory=list)  # one per file; a missing one is 1.0


NETWORK_ARGS = (
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "block_dims", "block_alphas", "conv_block_dims",
    "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
    "algo", "preset", "dora_wd", "wd_on_output", "use_tucker", "use_scalar", "factor", "decompose_both", "full_matrix",
    "unbalanced_factorization", "constraint", "rescaled", "train_on_input", "rank_dropout_scale", "bypass_mode", "train_norm",
    "unit",
)
# never written out: the run's .toml lies beside its LoRA, which gets shared (sd-scripts keeps them out of its logs too)
SECRET_KEYS = ("huggingface_token", "wandb_api_key")
# old names LyCORIS still reads: name -> (new name, whether the value flips)
NETWORK_ARG_ALIASES = {"use_cp": ("use_tucker", False), "use_conv_cp": ("use_tucker", False),
                       "disable_conv_cp": ("use_tucker", True), "constrain": ("constraint", False), "dropout": ("network_dropout", False),
                       "block_size": ("unit", False)}


@dataclass
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    optimizer_args: list = field(default_factory=list)  # ["weight_decay=0.01", "betas=(0.9,0.99)"]
    learning_rate: float = 2e-6  # sd-scripts' default; its LoRA guide recommends 1e-4
    unet_lr: Optional[float] = None
    text_encoder_lr: Optional[float] = None
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0  # steps, or a fraction (< 1) of the total steps
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: Optional[float] = None
    lr_scheduler_timescale: Optional[int] = None  # inverse_sqrt; None: the warmup steps
    lr_decay_steps: float = 0  # warmup_stable_decay: steps, or a fraction (< 1) of the total steps
    lr_scheduler_type: str = ""  # a scheduler class: a torch.optim.lr_scheduler name or a dotted import path
    lr_scheduler_args: list = field(default_factory=list)  # ["T_max=100"], passed to the scheduler


@dataclass
class TrainingConfig(NoiseOptions, LossOptions):
    """Steps, batch, precision, and (inherited) the noise, timestep and loss options."""

    max_train_steps: int = 1600
    max_train_epochs: Optional[int] = None
    # ours: a time budget; the epochs are lowered (never raised) to what the run's estimate fits in it (train/estimate.py)
    max_train_minutes: Optional[float] = None
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    seed: Optional[int] = None
    mixed_precision: str = "no"  # no | fp16 | bf16
    prior_loss_weight: float = 1.0
    cache_text_encoder_outputs: bool = False
    # how captions reach the text encoders, as in sd-scripts: up to 150 or 225 tokens in 75-token
    # chunks (None or 75: cut at 75), and (word:1.3) weights read from the captions
    max_token_length: Optional[int] = None
    weighted_captions: bool = False
    # how often the loss is read back from the device (a sync); NaN/inf is noticed then
    loss_readback_steps: int = 1
    # max-norm regularisation: after each step, LoRA modules whose weight change is longer than this are scaled down
    scale_weight_norms: Optional[float] = None
    # start the count later (sd-scripts' initial_epoch / initial_step); the LR schedule still starts at 0
    initial_epoch: Optional[int] = None
    initial_step: Optional[int] = None
    skip_until_initial_step: bool = False  # also skip the first steps' batches, instead of restarting the epoch's data
    # the loss on the held-out images (validation_split, a dataset key): every N steps, and every N epochs
    # (None: every epoch when there are held-out images), over at most max_validation_steps batches
    validate_every_n_steps: Optional[int] = None
    validate_every_n_epochs: Optional[int] = None
    max_validation_steps: Optional[int] = None


@dataclass
class SavingConfig:
    output_dir: str = "output"
    output_name: str = "last"
    save_model_as: str = "safetensors"
    save_precision: Optional[str] = None
    save_every_n_epochs: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    save_last_n_epochs: Optional[int] = None
    save_last_n_steps: Optional[int] = None
    save_n_epoch_ratio: Optional[int] = None  # at least this many epoch saves: save_every_n_epochs = epochs // ratio (at least 1)
    save_last_n_epochs_state: Optional[int] = None  # keep this many epoch state folders (default: save_last_n_epochs)
    save_last_n_steps_state: Optional[int] = None  # keep the state folders of this many last steps (default: save_last_n_steps)
    save_state: bool = False  # also write optimizer/scheduler/RNG state with each save, for resume
    save_state_on_train_end: bool = False
    resume: Optional[str] = None  # a state folder written by save_state
    training_comment: Optional[str] = None
    no_metadata: bool = False  # keep only the ss_* keys loaders need, and the modelspec.* keys
    # modelspec.* of the saved file, as sd-scripts' sai_model_spec writes them; title defaults to output_name
    metadata_title: Optional[str] = None
    metadata_author: Optional[str] = None
    metadata_description: Optional[str] = None
    metadata_license: Optional[str] = None
    metadata_tags: Optional[str] = None  # comma-separated
    metadata_usage_hint: Optional[str] = None
    metadata_thumbnail: Optional[str] = None  # a data: URL, or an image file embedded as one
    metadata_merged_from: Optional[str] = None
    metadata_trigger_phrase: Optional[str] = None
    metadata_preprocessor: Optional[str] = None
    metadata_is_negative_embedding: Optional[str] = None
    # upload each save to a Hugging Face repository (huggingface_hub), as sd-scripts does
    huggingface_repo_id: Optional[str] = None
    huggingface_repo_type: Optional[str] = None  # model (huggingface_hub's default), dataset, space
    huggingface_path_in_repo: Optional[str] = None
    huggingface_token: Optional[str] = None  # None: huggingface_hub's own login (HF_TOKEN, huggingface-cli login)
    huggingface_repo_visibility: Optional[str] = None  # "public"; anything else creates a private repo
    save_state_to_huggingface: bool = False
    resume_from_huggingface: bool = False  # resume = "owner/repo/path/in/repo[:revision[:repo_type]]"
    async_upload: bool = False


@dataclass
class LoggingConfig:
    logging_dir: Optional[str] = None  # TensorBoard event files go here
    log_with: Optional[str] = None  # tensorboard (default when logging_dir is set), wandb, all
    log_prefix: Optional[str] = None
    log_tracker_name: Optional[str] = None  # sd-scripts' default: network_train
    wandb_run_name: Optional[str] = None
    log_tracker_config: Optional[str] = None  # a TOML file: per-tracker init arguments ([wandb], [tensorboard])
    wandb_api_key: Optional[str] = None


@dataclass
class SamplingConfig:
    sample_prompts: Optional[str] = None  # .txt/.toml/.json in sd-scripts' format
    sample_every_n_epochs: Optional[int] = None
    sample_every_n_steps: Optional[int] = None
    sample_sampler: str = "euler_a"  # sd-scripts defaults to ddim, which is poor for SDXL
    sample_at_first: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Not settings: what reading the config said, for the front ends to show and the trainer to
    # carry. `notes`: sd-scripts options read another way or not needed (compat.py); `warnings`:
    # a file read after normalising pasted text.
    notes: list[str] = field(default_factory=list, compare=False, repr=False)
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    # -- keys ------------------------------------------------------------------------------------
    @staticmethod
    def sections() -> dict[str, type]:
        return _SECTION_TYPES

    @staticmethod
    def key_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
        """sd-scripts key -> (section name, field, type hint)."""
        return _key_index()

    def get(self, key: str) -> Any:
        section, f, _ = self.key_index()[key]
        return getattr(getattr(self, section), f.name)

    def set(self, key: str, value: Any, source: str = "config") -> None:
        index = self.key_index()
        if key not in index:
            raise UserError(msg("{source}: unknown key '{key}'{hint}", source=source, key=key, hint=close_match_hint(key, index)))
        section, f, hint = index[key]
        setattr(getattr(self, section), f.name, _coerce(value, hint, key, source))

    # -- dict / TOML -----------------------------------------------------------------------------
    def update(self, flat: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Set the keys of `flat`. sd-scripts options outside the tree are read as their key, or
        accepted with a note appended to `notes`, or refused (compat.py); all keys that cannot be
        used are named in one error, before anything is set."""
        flat = dict(flat)
        args = flat.pop("network_args", None)
        flat, notes, refused = compat.translate(flat, source)
        unknown = [k for k in flat if k not in self.key_index()]
        if args is not None:
            flat.update(_parse_network_args(args, source))
        lines = []
        if unknown:
            choices = [*self.key_index(), *compat.known_keys()]
            lines.append(msg("{source}: unknown keys:", source=source) if len(unknown) > 1 else msg("{source}: unknown key:", source=source))
            lines += ["  " + _unknown_key_line(k, choices) for k in unknown]
        if len(refused) == 1 and not unknown:
            key, reason = refused[0]
            lines.append(msg("{source}: {key}: {reason}", source=source, key=key, reason=reason))
        elif refused:
            lines.append(msg("{source}: these sd-scripts options cannot be used:", source=source))
            lines += ["  " + msg("{what}: {reason}", what=key, reason=reason) for key, reason in refused]
        if lines:
            raise UserError("\n".join(lines))
        for k, v in flat.items():
            self.set(k, v, source)
        self.notes += [n for n in notes if n not in self.notes]
        return self

    def to_flat(self) -> dict[str, Any]:
        return {k: self.get(k) for k in self.key_index()}

    def to_toml_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for section in self.sections():
            values = {k: v for k, v in dataclasses.asdict(getattr(self, section)).items() if v is not None and k not in SECRET_KEYS}
            if section == "network":
                extra = [f"{k}={values.pop(k)}" for k in NETWORK_ARGS if k in values and values[k] != getattr(NetworkConfig(), k)]
                for k in NETWORK_ARGS:
                    values.pop(k, None)
                if extra:
                    values["network_args"] = extra
            out[section] = values
        return out

    def save_toml(self, path: str | os.PathLike) -> Path:
        return write_toml(path, self.to_toml_dict())

    @classmethod
    def from_toml(cls, path: str | os.PathLike, write_prompts: bool = True) -> "TrainConfig":
        """An sd-scripts or lora-scripts TOML (its GUI's own fields are read as the keys it sends)."""
        from lora_train.train import lora_scripts

        config = cls()
        data = read_toml(path, msg("config file"), warn=config.warnings.append)
        data, notes = lora_scripts.unwrap_template(data, str(path))
        flat, more = lora_scripts.translate(flatten_one_level(data), str(path), write_prompts)
        config.notes += notes + more
        return config.update(flat, source=str(path))

    @classmethod
    def from_kohya_ss(cls, path: str | os.PathLike, write_prompts: bool = True) -> "TrainConfig":
        """A kohya_ss GUI config (JSON), read as the sd-scripts keys kohya_ss passes (train/kohya_ss.py)."""
        import json

        from lora_train.train import kohya_ss

        path = Path(path)
        if not path.is_file():
            raise UserError(msg("{what} '{path}' does not exist", what=msg("config file"), path=path))
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(msg("{path}: not valid JSON ({error})", path=path, error=e)) from e
        config = cls()
        known = set(config.key_index()) | compat.known_keys() | {"network_args"}
        flat, notes = kohya_ss.translate(data, str(path), known.__contains__, write_prompts=write_prompts)
        config.notes += notes
        return config.update(flat, source=str(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike, write_prompts: bool = True) -> "TrainConfig":
        """`--config FILE`: a .json is a kohya_ss GUI config, anything else TOML."""
        if Path(path).suffix.lower() == ".json":
            return cls.from_kohya_ss(path, write_prompts)
        return cls.from_toml(path, write_prompts)


_SECTION_TYPES = {
    "model": ModelConfig,
    "network": NetworkConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "dataset": DatasetConfig,
    "saving": SavingConfig,
    "logging": LoggingConfig,
    "sampling": SamplingConfig,
}


@functools.lru_cache(maxsize=1)
def _key_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    index = {}
    for section, section_type in _SECTION_TYPES.items():
        hints = typing.get_type_hints(section_type)
        for f in dataclasses.fields(section_type):
            index[f.name] = (section, f, hints[f.name])
    return index


def flatten_one_level(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' rule: a table's keys are read as top-level keys and the table name is ignored."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_set_value(text: str) -> Any:
    """`--set key=value`: the value is read as a TOML value when it is one, else as a string."""
    return parse_toml_value(text)


def _unknown_key_line(key: str, choices) -> str:
    """`netwrok_dim (did you mean 'network_dim'?)`, one line of a list, so the hint is translated with it."""
    match = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return msg("{key} (did you mean '{match}'?)", key=key, match=match[0]) if match else key


def _parse_network_args(args: Any, source: str) -> dict[str, Any]:
    if isinstance(args, str):
        args = args.split()
    known = set(NETWORK_ARGS)
    out = {}
    for item in args:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if key in NETWORK_ARG_ALIASES and sep:
            key, flip = NETWORK_ARG_ALIASES[key]
            if flip:
                value = str(value.strip().lower() not in ("true", "1", "yes"))
        if not sep or (key not in known and key != "network_dropout"):
            raise UserError(msg("{source}: network_args entry '{item}' is not supported yet (known: {known})",
                                source=source, item=item, known=", ".join(sorted(known))))
        out[key] = parse_set_value(value.strip())
    return out


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
            return None
        return _coerce(value, inner[0], key, source)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if hint is list:
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()
    except (TypeError, ValueError) as e:
        raise UserError(msg("{source}: '{key}' must be {type}, got {value}", source=source, key=key, type=hint.__name__,
                            value=repr(value))) from e
    return value
