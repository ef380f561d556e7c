"""kohya_ss GUI configs (the JSON its LoRA tab saves, and its `presets/lora/*.json`), read as the
sd-scripts keys kohya_ss itself would pass to `train_network.py` / `sdxl_train_network.py`.

kohya_ss turns its form into an sd-scripts config when it starts a run (`kohya_gui/lora_gui.py`,
`train_model`): some fields are renamed (`max_resolution` -> `resolution`, `optimizer` ->
`optimizer_type`), `LoRA_type` chooses the network module and which of the network fields go into
`network_args`, 0 means "unset" for many numbers, the text encoder / UNet learning rates choose
which part trains, and `additional_parameters` is a command line appended as is. This module does
the same translation, so a config trains here as it would there, and says in notes what it
translated and what kohya_ss does not pass (a field of another LoRA type, a GUI-only setting).
Flux.1 / SD3 / other model families are refused: LoRA Train trains SD1.x, SD2.x and SDXL.
"""

from __future__ import annotations

import math
import shlex
from typing import Any, Callable

from lora_train.errors import UserError, close_match_hint, msg
from lora_train.train.prompt_file import write_prompt_file

# LoRA_type -> (network_module, LyCORIS algo or None, the kohya_ss fields it passes in network_args)
_BLOCKS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims", "block_alphas",
           "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
_LYCORIS_COMMON = ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                   "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm")
LORA_TYPES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "Standard": ("networks.lora", None, _BLOCKS),
    "Kohya LoCon": ("networks.lora", None, ("conv_dim", "conv_alpha", *_BLOCKS)),
    "Kohya DyLoRA": ("networks.dylora", None, ("conv_dim", "conv_alpha", "unit", *_BLOCKS)),
    "LoCon": ("lycoris.kohya", "locon", _LYCORIS_COMMON),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon", _LYCORIS_COMMON),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha", _LYCORIS_COMMON),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr", (*_LYCORIS_COMMON, "factor", "use_cp", "decompose_both")),
    "LyCORIS/iA3": ("lycoris.kohya", "ia3", ("LyCORIS_preset", "conv_dim", "conv_alpha", "train_on_input")),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", "diag-oft", ("LyCORIS_preset", "conv_dim", "conv_alpha", "module_dropout", "use_tucker",
                                                     "rank_dropout", "rank_dropout_scale", "constrain", "rescaled", "train_norm")),
    "LyCORIS/BOFT": ("lycoris.kohya", "boft", ("LyCORIS_preset", "conv_dim", "conv_alpha", "module_dropout", "use_tucker",
                                             "rank_dropout", "rank_dropout_scale", "train_norm")),
    "LyCORIS/DyLoRA": ("lycoris.kohya", "dylora", ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "unit", "rank_dropout",
                                                 "module_dropout", "train_norm")),
    "LyCORIS/GLoRA": ("lycoris.kohya", "glora", ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout",
                                               "module_dropout", "rank_dropout_scale", "train_norm")),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", "full", ("LyCORIS_preset", "rank_dropout", "module_dropout",
                                                            "rank_dropout_scale", "train_norm")),
}
# kohya_ss network field -> our key (LyCORIS' network_args names)
_NETWORK_FIELD = {"LyCORIS_preset": "preset", "use_cp": "use_tucker", "constrain": "constraint"}
# the kohya_ss network fields, with the GUI's defaults (a field left at its default asks for nothing)
NETWORK_FIELDS: dict[str, Any] = {
    **dict.fromkeys(_BLOCKS, 0), "conv_dim": 1, "conv_alpha": 1, "unit": 1, "LyCORIS_preset": "full", "factor": -1,
    **dict.fromkeys(("use_tucker", "use_cp", "use_scalar", "bypass_mode", "dora_wd", "rank_dropout_scale", "train_norm",
                     "decompose_both", "train_on_input", "rescaled"), False),
    "constrain": 0, "conv_dims": "", "conv_alphas": "",  # the last two: fields of old kohya_ss versions, never passed
}
_FAMILY_TYPES = {"Flux1": "Flux.1", "Flux1 OFT": "Flux.1", "HunyuanImage-2.1": "HunyuanImage-2.1", "Anima": "Anima",
                 "Lumina": "Lumina Image 2.0"}
_FAMILY_CHECKBOXES = {"flux1_checkbox": "Flux.1", "sd3_checkbox": "SD3", "hunyuan_image_checkbox": "HunyuanImage-2.1",
                      "anima_checkbox": "Anima", "lumina_checkbox": "Lumina Image 2.0"}
_NOT_YET_TYPES = {
    "LoRA-FA": msg("LoRA-FA (networks.lora_fa) is not supported yet; choose Standard"),
    "Kohya LoHa": msg("sd-scripts' own LoHa (networks.loha) is not supported yet; choose LyCORIS/LoHa"),
    "Kohya LoKr": msg("sd-scripts' own LoKr (networks.lokr) is not supported yet; choose LyCORIS/LoKr"),
}

# kohya_ss field -> sd-scripts key, for the renamed ones
RENAMED = {"max_resolution": "resolution", "optimizer": "optimizer_type", "lora_network_weights": "network_weights"}
# fields read together below, by their own rules
_COMPOSITE = {
    "LoRA_type", "epoch", "text_encoder_lr", "unet_lr", "learning_rate", "lr_warmup", "lr_warmup_steps", "lr_scheduler_num_cycles",
    "optimizer_args", "lr_scheduler_args", "noise_offset_type", "noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
    "multires_noise_iterations", "multires_noise_discount", "sdxl", "sdxl_cache_text_encoder_outputs", "sdxl_no_half_vae",
    "xformers", "sample_prompts", "additional_parameters", "network_args", "stop_text_encoder_training",
    "stop_text_encoder_training_pct", "use_wandb", "train_inpainting", "dynamo_backend", "persistent_data_loader_workers",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "no_token_padding", "max_token_length",
    *_FAMILY_CHECKBOXES,
}
# kohya_ss settings of the GUI or of `accelerate launch`, not training options
GUI_ONLY = {
    "save_as_bool", "file_path", "model_list", "num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu",
    "gpu_ids", "main_process_port", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic", "extra_accelerate_launch_args",
    "lowvram",
}
# fields of the other model families' sections (Flux.1, SD3, HunyuanImage, Anima, Lumina), read only with their checkbox
_OTHER_FAMILY_PREFIXES = ("flux1_", "sd3_", "hunyuan_", "anima_", "lumina_", "t5xxl", "clip_g", "img_", "txt_", "single_",
                          "double_", "ggpo_", "train_double_", "train_single_")
_OTHER_FAMILY = {
    "t5xxl_lr", "fp8_base_unet", "model_type", "ae", "clip_l", "discrete_flow_shift", "model_prediction_type", "timestep_sampling",
    "split_mode", "train_blocks", "enable_all_linear", "guidance_scale", "mem_eff_save", "apply_t5_attn_mask", "split_qkv",
    "train_t5xxl", "cpu_offload_checkpointing", "blocks_to_swap", "show_timesteps", "show_timesteps_resolution", "in_dims",
    "logit_mean", "logit_std", "mode_scale", "pos_emb_random_crop_rate", "save_clip", "weighting_scheme", "train_lora_ggpo",
}
# fields that say a JSON is a kohya_ss config (its LoRA tab always saves LoRA_type)
_MARKERS = {"LoRA_type", "max_resolution", "epoch", "save_as_bool", "model_list", "LyCORIS_preset", "additional_parameters"}


def looks_like_kohya_ss(data: Any) -> bool:
    return isinstance(data, dict) and "LoRA_type" in data


def is_other_family(key: str) -> bool:
    return key in _OTHER_FAMILY or key.startswith(_OTHER_FAMILY_PREFIXES)


def translate(data: dict[str, Any], source: str, known: Callable[[str], bool],
              write_prompts: bool = True) -> tuple[dict[str, Any], list[str]]:
    """(the sd-scripts keys kohya_ss would pass, the notes). `known(key)`: whether a key is one the
    config reads (a config key or an sd-scripts option compat knows)."""
    if not looks_like_kohya_ss(data):
        if isinstance(data, dict) and _MARKERS & set(data):
            raise UserError(msg("{source}: a kohya_ss config without LoRA_type (a DreamBooth or fine-tuning tab config?); "
                                "LoRA Train reads the configs of kohya_ss' LoRA tab", source=source))
        raise UserError(msg("{source}: not a kohya_ss config (a kohya_ss LoRA config is a JSON object with a LoRA_type field)",
                            source=source))
    reader = _Reader(data, source)
    reader.refuse_other_families()
    flat: dict[str, Any] = {}
    reader.network(flat)
    reader.length(flat)
    reader.learning_rates(flat)
    reader.noise(flat)
    reader.family_options(flat)
    reader.misc(flat, write_prompts)
    reader.plain(flat, known)
    reader.additional_parameters(flat)
    return flat, reader.notes


class _Reader:
    def __init__(self, data: dict[str, Any], source: str):
        self.data, self.source, self.notes = data, source, []
        self.unused: list[str] = []  # "key=value" kohya_ss does not pass with these settings

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key, default)
        return default if value is None or (isinstance(value, str) and value.strip() == "") else value

    def number(self, key: str, default: float = 0.0) -> float:
        value = self.get(key, default)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(msg("{source}: '{key}' must be a number, got {value}", source=self.source, key=key, value=repr(value))) from None

    def note(self, keys: str, reason: str) -> None:
        self.notes.append(msg("{source}: {key}: {reason}", source=self.source, key=keys, reason=reason))

    def refuse_other_families(self) -> None:
        lora_type = str(self.get("LoRA_type", "Standard"))
        family = _FAMILY_TYPES.get(lora_type) or next((name for key, name in _FAMILY_CHECKBOXES.items() if self.get(key)), None)
        if family:
            raise UserError(msg("{source}: a config for {family}: LoRA Train trains SD1.x, SD2.x and SDXL LoRAs only",
                                source=self.source, family=family))

    # -- LoRA_type and its network fields ---------------------------------------------------------
    def network(self, flat: dict[str, Any]) -> None:
        lora_type = str(self.get("LoRA_type", "Standard"))
        if lora_type in _NOT_YET_TYPES:
            raise UserError(msg("{source}: LoRA_type {value}: {reason}", source=self.source, value=lora_type,
                                reason=_NOT_YET_TYPES[lora_type]))
        if lora_type not in LORA_TYPES:
            raise UserError(msg("{source}: LoRA_type '{value}' is not one LoRA Train trains (it trains {known}){hint}",
                                source=self.source, value=lora_type, known=", ".join(LORA_TYPES),
                                hint=close_match_hint(lora_type, LORA_TYPES)))
        module, algo, passed = LORA_TYPES[lora_type]
        flat["network_module"] = module
        if algo:
            flat["algo"] = algo
        for field in passed:
            value = self.get(field)
            if value is None:
                continue
            if module != "lycoris.kohya" and not _asks(field, value):
                continue  # kohya_ss passes sd-scripts' network fields only when set
            flat[_NETWORK_FIELD.get(field, field)] = value
        unused = [f"{k}={self.data[k]}" for k in NETWORK_FIELDS if k in self.data and k not in passed and _asks(k, self.data[k])]
        if unused:
            self.note(", ".join(unused), msg("not used with LoRA_type {value}: kohya_ss does not pass them for it either", value=lora_type))
        desc = f"network_module={module}" + (f", algo={algo}" if algo else "")
        self.note("LoRA_type", msg("'{value}' read as {what}", value=lora_type, what=desc))
        ratios = [k for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio") if _asks(k, self.data.get(k))]
        if ratios:
            raise UserError(msg("{source}: {key}: not supported yet: LoRA+ learning-rate ratios", source=self.source, key=", ".join(ratios)))

    # -- run length -------------------------------------------------------------------------------
    def length(self, flat: dict[str, Any]) -> None:
        epoch = int(self.number("epoch", 1))
        steps = int(self.number("max_train_steps", 0))
        epochs = int(self.number("max_train_epochs", 0))
        if epochs:
            self.note("epoch", msg("not used: max_train_epochs is set, which sd-scripts reads first"))
        elif steps:
            self.note("epoch", msg("not used: max_train_steps is set, and kohya_ss passes that"))
        elif self.get("dataset_config"):
            self.note("epoch", msg("not used with dataset_config and max_train_steps 0: kohya_ss leaves the length to "
                                   "sd-scripts' default of 1600 steps"))
        else:
            flat["max_train_epochs"] = epoch
            self.note("epoch", msg("read as max_train_epochs {value} (kohya_ss turns it into max_train_steps from the image count)",
                                   value=epoch))
        cycles = self.get("lr_scheduler_num_cycles")
        flat["lr_scheduler_num_cycles"] = int(float(cycles)) if cycles is not None else epoch
        for key in ("stop_text_encoder_training", "stop_text_encoder_training_pct"):
            if _asks(key, self.get(key)):
                self.note(key, msg("not used: kohya_ss ignores it for LoRA (\"not yet supported\")"))

    # -- learning rates ---------------------------------------------------------------------------
    def learning_rates(self, flat: dict[str, Any]) -> None:
        lr, te, unet = self.number("learning_rate"), self.number("text_encoder_lr"), self.number("unet_lr")
        if lr == 0 and te == 0 and unet == 0:
            raise UserError(msg("{source}: learning_rate, text_encoder_lr and unet_lr are all 0: set a learning rate", source=self.source))
        flat["learning_rate"] = lr
        if te:
            flat["text_encoder_lr"] = te
        if unet:
            flat["unet_lr"] = unet
        if te == 0 and unet != 0:
            flat["network_train_unet_only"] = True
            self.note("text_encoder_lr", msg("0 with unet_lr set: kohya_ss trains the UNet only (network_train_unet_only)"))
        elif te != 0 and unet == 0:
            flat["network_train_text_encoder_only"] = True
            self.note("unet_lr", msg("0 with text_encoder_lr set: kohya_ss trains the text encoder only (network_train_text_encoder_only)"))
        warmup_pct, warmup_steps = self.number("lr_warmup"), self.number("lr_warmup_steps")
        if warmup_steps > 0:
            flat["lr_warmup_steps"] = int(warmup_steps)
            if warmup_pct:
                self.note("lr_warmup", msg("not used: lr_warmup_steps is set, which kohya_ss passes instead"))
        elif warmup_pct:
            flat["lr_warmup_steps"] = warmup_pct / 100
            self.note("lr_warmup", msg("{value} % read as lr_warmup_steps {fraction} (a fraction of the steps)", value=warmup_pct,
                                       fraction=warmup_pct / 100))
        for key, target in (("optimizer_args", "optimizer_args"), ("lr_scheduler_args", "lr_scheduler_args")):
            words = _words(self.get(key, ""))
            if words:
                flat[target] = words

    # -- noise ------------------------------------------------------------------------------------
    def noise(self, flat: dict[str, Any]) -> None:
        kind = str(self.get("noise_offset_type", "Original"))
        original = ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale")
        multires = ("multires_noise_iterations", "multires_noise_discount")
        if kind not in ("Original", "Multires"):
            raise UserError(msg("{source}: noise_offset_type '{value}' is not Original or Multires", source=self.source, value=kind))
        used, other = (original, multires) if kind == "Original" else (multires, original)
        for key in used:
            if self.get(key) is not None and (key == "multires_noise_discount" or _asks(key, self.data[key])):
                flat[key] = self.data[key]
        unused = [f"{k}={self.data[k]}" for k in other if _asks(k, self.data.get(k)) and k != "multires_noise_discount"]
        if unused:
            self.note(", ".join(unused), msg("not used with noise_offset_type {value}, as in kohya_ss", value=kind))

    # -- SDXL / SD2 switches ------------------------------------------------------------------------
    def family_options(self, flat: dict[str, Any]) -> None:
        sdxl = bool(self.get("sdxl"))
        if sdxl:
            self.note("sdxl", msg("LoRA Train reads the model family from the checkpoint (sdxl_train_network.py is not a separate script here)"))
        for key, target in (("sdxl_cache_text_encoder_outputs", "cache_text_encoder_outputs"), ("sdxl_no_half_vae", "no_half_vae")):
            if self.get(key):
                if sdxl:
                    flat[target] = True
                else:
                    self.note(key, msg("not used without sdxl, as in kohya_ss"))

    def misc(self, flat: dict[str, Any], write_prompts: bool) -> None:
        attention = str(self.get("xformers", "none")).lower()
        if attention in ("xformers", "true"):
            flat["xformers"] = True
        elif attention == "sdpa":
            flat["sdpa"] = True
        tokens = self.get("max_token_length")
        if tokens is not None:
            flat["max_token_length"] = int(float(tokens))
        if self.get("persistent_data_loader_workers"):
            flat["persistent_data_loader_workers"] = True
        backend = str(self.get("dynamo_backend", "no")).lower()
        if backend != "no":
            flat["dynamo_backend"] = backend
        if self.get("use_wandb"):  # kohya_ss' old switch
            flat["log_with"] = "wandb"
            self.note("use_wandb", msg("read as log_with wandb"))
        if self.get("train_inpainting"):
            raise UserError(msg("{source}: train_inpainting: not supported yet: inpainting training", source=self.source))
        if self.get("no_token_padding"):
            self.note("no_token_padding", msg("a DreamBooth option train_network.py does not read; not used"))
        self.sample_prompts(flat, write_prompts)

    def sample_prompts(self, flat: dict[str, Any], write: bool) -> None:
        text = self.get("sample_prompts")
        if text is None:
            return
        if not (self.number("sample_every_n_epochs") or self.number("sample_every_n_steps")):
            self.note("sample_prompts", msg("not used: sample_every_n_epochs and sample_every_n_steps are 0"))
            return
        if not write:
            self.note("sample_prompts", msg("prompt text, not a file: save it as a .txt file and set sample_prompts to it"))
            return
        path = write_prompt_file(str(text), self.get("output_dir", "."), self.source)
        flat["sample_prompts"] = str(path)
        self.note("sample_prompts", msg("written to {path}, as kohya_ss does", path=path))

    # -- everything else ----------------------------------------------------------------------------
    def plain(self, flat: dict[str, Any], known: Callable[[str], bool]) -> None:
        gui, families, unknown = [], 0, []
        for key, value in self.data.items():
            if key in _COMPOSITE or key in NETWORK_FIELDS or key in flat:
                continue
            if key in GUI_ONLY:
                if _asks(key, value):
                    gui.append(key)
                continue
            if is_other_family(key):
                families += 1
                continue
            target = RENAMED.get(key, key)
            if not known(target):
                unknown.append(key + close_match_hint(key, [*NETWORK_FIELDS, *RENAMED, *_COMPOSITE]))
                continue
            if _dropped(value):
                continue
            flat[target] = value
            if target != key:
                self.note(key, msg("read as {key}", key=target))
        if gui:
            self.note(", ".join(gui), msg("settings of the kohya_ss GUI or of accelerate launch, not of the training; not used"))
        if families:
            self.notes.append(msg("{source}: {count} fields of other model families (Flux.1, SD3, ...) not used: kohya_ss reads "
                                  "them only with their family's checkbox", source=self.source, count=families))
        if unknown:
            self.notes.append(msg("{source}: not kohya_ss fields LoRA Train knows, not used (kohya_ss ignores unknown fields too): {keys}",
                                  source=self.source, keys=", ".join(unknown)))

    def additional_parameters(self, flat: dict[str, Any]) -> None:
        """kohya_ss appends this text to the sd-scripts command line: its options override the form's."""
        parsed = parse_command_line(str(self.get("additional_parameters", "")), self.source)
        args = self.get("network_args")
        if args:  # older kohya_ss configs: a network_args string of their own
            parsed.setdefault("network_args", [])
            parsed["network_args"] = _words(args) + list(parsed["network_args"])
        if parsed:
            flat.update(parsed)
            self.note("additional_parameters", msg("read as {keys}", keys=", ".join(sorted(parsed))))


def parse_command_line(text: str, source: str) -> dict[str, Any]:
    """`--key value`, `--key=value`, `--flag` and `--key v1 v2` (a list, for network_args and the like)."""
    try:
        words = shlex.split(text, posix=True)
    except ValueError as e:
        raise UserError(msg("{source}: additional_parameters: {error}", source=source, error=e)) from e
    out: dict[str, Any] = {}
    key = None
    for word in words:
        if word.startswith("--"):
            name, sep, value = word[2:].partition("=")
            key = name.replace("-", "_")
            out[key] = value if sep else True
            if sep:
                key = None
        elif key is None:
            raise UserError(msg("{source}: additional_parameters: '{word}' does not follow an --option", source=source, word=word))
        else:
            previous = out[key]
            out[key] = word if previous is True else (previous if isinstance(previous, list) else [previous]) + [word]
    return out


def _words(text: Any) -> list[str]:
    if isinstance(text, (list, tuple)):
        return [str(v) for v in text]
    return str(text).replace('"', "").split()


def _dropped(value: Any) -> bool:
    """kohya_ss writes its config without the values equal to "", False or None, which in Python
    are also 0 and 0.0: a 0 in the form is sd-scripts' default (max_grad_norm 0 included)."""
    return value is None or (isinstance(value, str) and value.strip() == "") or (not isinstance(value, str) and value == 0)


def _asks(key: str, value: Any) -> bool:
    """The field asks for something: not unset, not the GUI's default."""
    if value is None or value is False or (isinstance(value, str) and value.strip() == ""):
        return False
    default = NETWORK_FIELDS.get(key, 0)
    try:
        return not math.isclose(float(value), float(default))
    except (TypeError, ValueError):
        return str(value) != str(default)
