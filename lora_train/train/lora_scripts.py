"""lora-scripts (Akegarasu/lora-scripts, "秋叶") configs: its `config/*.toml`, the templates in
`config/presets/*.toml`, and the form fields its GUI keeps beside sd-scripts' keys.

Its own names are read as the sd-scripts keys its GUI turns them into before it starts
sd-scripts (`lycoris_algo` -> network_args `algo`, `network_args_custom` appended to network_args
...), and `lr_restart_cycles`, the name its train.sh passed as lr_scheduler_num_cycles, is read as that.
"""

from __future__ import annotations

from typing import Any

from lora_train.errors import UserError, msg
from lora_train.train.prompt_file import write_prompt_file

# model_train_type -> what it trains (lora-scripts' trainer_mapping)
_TRAIN_TYPES = {"sd-lora": None, "sdxl-lora": None,
                "sd-dreambooth": msg("a DreamBooth fine-tuning config: LoRA Train trains LoRAs"),
                "sdxl-finetune": msg("a fine-tuning config: LoRA Train trains LoRAs"),
                **{name: msg("a config for {family}: LoRA Train trains SD1.x, SD2.x and SDXL LoRAs only", family=family)
                   for name, family in (("flux-finetune", "Flux.1"), ("flux-lora", "Flux.1"), ("sd3-lora", "SD3"),
                                        ("lumina2-lora", "Lumina Image 2.0"))}}
# form field -> the network_args / optimizer_args entry its GUI writes
_NETWORK_FIELDS = {"lycoris_algo": "algo", "lokr_factor": "factor", "dylora_unit": "unit"}
_OPTIMIZER_FIELDS = {"prodigy_d0": "d0", "prodigy_d_coef": "d_coef"}
# switch -> the fields it shows; off, the GUI does not send them
_SWITCHES = {
    "enable_block_weights": ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"),
    "enable_base_weight": ("base_weights", "base_weights_multiplier"),
    "enable_preview": ("sample_prompts", "sample_sampler", "sample_every_n_epochs", "sample_every_n_steps", "sample_at_first",
                       "prompt_file", "positive_prompts", "negative_prompts", "sample_width", "sample_height", "sample_cfg",
                       "sample_seed", "sample_steps", "randomly_choice_prompt"),
}
_PROMPT_FORM = ("positive_prompts", "negative_prompts", "sample_width", "sample_height", "sample_cfg", "sample_seed", "sample_steps",
                "randomly_choice_prompt")
FIELDS = {"lr_restart_cycles", "model_train_type", "dropout", "gpu_ids", "network_args_custom", "optimizer_args_custom", "ui_custom_params", "prompt_file",
          *_NETWORK_FIELDS, *_OPTIMIZER_FIELDS, *_SWITCHES, *_PROMPT_FORM}


def unwrap_template(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """A template of `config/presets/`: its settings are the [data] table; [metadata] describes it."""
    meta = data.get("metadata")
    if not (isinstance(meta, dict) and isinstance(data.get("data"), dict) and {"name", "author", "version"} & set(meta)):
        return data, []
    train_type = str(meta.get("train_type", "") or "")
    if _TRAIN_TYPES.get(train_type):
        raise UserError(msg("{source}: {reason}", source=source, reason=_TRAIN_TYPES[train_type]))
    note = msg("{source}: a lora-scripts template ('{name}'): its settings are the [data] table; [metadata] is not read",
               source=source, name=meta.get("name", ""))
    return {k: v for k, v in data.items() if k != "metadata"}, [note]


def translate(flat: dict[str, Any], source: str, write_prompts: bool = True) -> tuple[dict[str, Any], list[str]]:
    """`flat` with lora-scripts' form fields read as the sd-scripts keys its GUI sends, and the notes.
    With write_prompts, the prompt form becomes a prompt file as the GUI makes it; without (the tab's
    Load, which writes nothing), a note says so."""
    if not FIELDS & set(flat):
        return flat, []
    out = dict(flat)
    notes: list[str] = []

    def note(keys: str, reason: str) -> None:
        notes.append(msg("{source}: {key}: {reason}", source=source, key=keys, reason=reason))

    if "lr_restart_cycles" in out:
        out.setdefault("lr_scheduler_num_cycles", out.pop("lr_restart_cycles"))
        out.pop("lr_restart_cycles", None)
        note("lr_restart_cycles", msg("lora-scripts' name, read as lr_scheduler_num_cycles"))
    train_type = out.pop("model_train_type", None)
    if train_type is not None:
        if str(train_type) not in _TRAIN_TYPES:
            raise UserError(msg("{source}: model_train_type '{value}' is not one of {known}", source=source, value=train_type,
                                known=", ".join(_TRAIN_TYPES)))
        if _TRAIN_TYPES[str(train_type)]:
            raise UserError(msg("{source}: {reason}", source=source, reason=_TRAIN_TYPES[str(train_type)]))
        note("model_train_type", msg("LoRA Train reads the model family from the checkpoint"))
    for switch, fields in _SWITCHES.items():
        if switch in out and not out.pop(switch):
            dropped = [k for k in fields if k in out and out.pop(k) not in (None, "", [], False)]
            if dropped:
                note(", ".join(dropped), msg("not used: {switch} is off, and lora-scripts does not send them", switch=switch))
    if out.get("prompt_file"):
        out["sample_prompts"] = out.pop("prompt_file")
        note("prompt_file", msg("read as sample_prompts"))
    out.pop("prompt_file", None)
    form = {k: out.pop(k) for k in _PROMPT_FORM if k in out}
    if form and "sample_prompts" in out:
        note(", ".join(form), msg("not used: sample_prompts is set, which lora-scripts reads first"))
    elif form:
        _prompt_form(form, out, source, write_prompts, note)
    if "dropout" in out:  # LyCORIS' dropout, sd-scripts' network_dropout
        out.setdefault("network_dropout", out.pop("dropout"))
        out.pop("dropout", None)
        note("dropout", msg("read as {key}", key="network_dropout"))
    _merge_args(out, "network_args", _NETWORK_FIELDS, note)
    _merge_args(out, "optimizer_args", _OPTIMIZER_FIELDS, note)
    if out.pop("gpu_ids", None):
        note("gpu_ids", msg("the GUI's GPU choice is not a training setting: set CUDA_VISIBLE_DEVICES, or use accelerate launch"))
    custom_params = out.pop("ui_custom_params", None)
    if custom_params and str(custom_params).strip():
        from lora_train.tomlfile import parse_toml_text

        extra = parse_toml_text(str(custom_params), msg("{source}: ui_custom_params", source=source))
        from lora_train.train.config import flatten_one_level

        extra = flatten_one_level(extra)
        out.update(extra)
        note("ui_custom_params", msg("read as {keys}", keys=", ".join(sorted(extra))))
    return out, notes


def _prompt_form(form: dict[str, Any], out: dict[str, Any], source: str, write: bool, note) -> None:
    """lora-scripts' preview form as the one prompt line its GUI writes, with its defaults."""
    keys = ", ".join(form)
    if form.get("randomly_choice_prompt"):
        raise UserError(msg("{source}: randomly_choice_prompt: not supported yet: a random caption of the dataset as the preview "
                            "prompt; write the prompt into positive_prompts", source=source))
    positive = str(form.get("positive_prompts") or "").strip()
    if not positive:
        note(keys, msg("not used: positive_prompts is empty, so lora-scripts renders no previews"))
        return
    line = (f"{positive} --n {form.get('negative_prompts') or ''} --w {form.get('sample_width', 512)} "
            f"--h {form.get('sample_height', 512)} --l {form.get('sample_cfg', 7)} --s {form.get('sample_steps', 24)} "
            f"--d {form.get('sample_seed', 2333)}")
    if not write:
        note(keys, msg("the preview prompt form: saved as a prompt file when the config is run from the command line; "
                       "here, write the prompts into sample_prompts (Preview prompts in the tab)"))
        return
    path = write_prompt_file(line, out.get("output_dir"), source)
    out["sample_prompts"] = str(path)
    note(keys, msg("read as the prompt line lora-scripts writes, saved to {path}", path=path))


def _merge_args(out: dict[str, Any], key: str, fields: dict[str, str], note) -> None:
    """The form's fields for `key` (network_args / optimizer_args) and its `<key>_custom` lines,
    appended to the list, as lora-scripts' GUI builds it."""
    args = _as_list(out.pop(key, []))
    for field, arg in fields.items():
        value = out.pop(field, None)
        if value not in (None, ""):
            args.append(f"{arg}={value}")
            note(field, msg("read as {key} {arg}", key=key, arg=arg))
    custom = _as_list(out.pop(key + "_custom", []))
    if custom:
        args += custom
        note(key + "_custom", msg("appended to {key}", key=key))
    if args:
        out[key] = args


def _as_list(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v).strip()]
    return [line.strip() for line in str(value).splitlines() if line.strip()]
