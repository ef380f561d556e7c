"""sd-scripts options that are not keys of the config tree: a config written for sd-scripts, kohya_ss
or lora-scripts names them, and none of them is "unknown".

Every option of sd-scripts' train_network.py / sdxl_train_network.py is a config key or one of:

- ALIASES: another name for a key (an old spelling, an old optimizer switch), read as that key;
- NOTED: accepted with a note saying what LoRA Train does instead. Only options that change speed,
  memory, logging or uploads belong here: the trained LoRA is the one sd-scripts would make;
- REFUSED: the run would differ from sd-scripts' (an option not supported yet, or one that has no
  place here); the reason says what it does and what to do instead.

A value that asks for nothing (false, empty, 0, sd-scripts' default) is accepted without a word: the
GUIs write every option they know with its default, and `xformers = false` needs no note.
"""

from __future__ import annotations

from typing import Any

from lora_train.errors import msg


def _not_yet(what: str) -> str:
    return msg("not supported yet: {what}", what=what)


_CONSOLE = msg("LoRA Train prints its progress and messages to the terminal; redirect them to a file to keep a log")
_PRECISION = msg("LoRA Train keeps the LoRA weights and their gradients in fp32 and computes in mixed_precision: "
                 "more memory, no loss of precision")
_DDP = msg("several GPUs: under accelerate launch LoRA Train averages the gradients itself, with no DDP wrapper to tune")
_MEMORY = msg("no effect in LoRA Train (in the WebUI, its own --lowram and --medvram flags decide where the model is kept)")
_DEEPSPEED_OPTION = msg("a DeepSpeed option, read only with deepspeed, which LoRA Train does not use")

# key -> what LoRA Train does instead
NOTED: dict[str, str] = {
    "console_log_level": _CONSOLE,
    "console_log_file": _CONSOLE,
    "console_log_simple": _CONSOLE,
    "tokenizer_cache_dir": msg("LoRA Train builds the tokenizers from files it carries; nothing is downloaded or cached"),
    "cache_info": msg("LoRA Train reads image sizes from the file headers at each start, which is quick without a cache"),
    "debug_dataset": msg("LoRA Train trains; to look at a dataset without training, run python -m lora_train dataset check"),
    "vae_batch_size": msg("latents are encoded one image at a time"),
    "skip_cache_check": msg("LoRA Train always checks cached latents against their image's hash"),
    "sdpa": msg("what LoRA Train always does: attention runs through PyTorch's scaled_dot_product_attention "
                "(in the WebUI, the cross-attention optimization chosen in its settings)"),
    "xformers": msg("attention runs through PyTorch's scaled_dot_product_attention, which saves what xformers saves "
                    "(xformers is not installed with LoRA Train and has no CPU build; in the WebUI, the cross-attention "
                    "optimization chosen in its settings)"),
    "mem_eff_attn": msg("attention runs through PyTorch's scaled_dot_product_attention, which saves the memory mem_eff_attn "
                        "saves (in the WebUI, the cross-attention optimization chosen in its settings)"),
    # satellites of a refused option: without it they do nothing, in sd-scripts too
    "torch_compile": msg("the model is not compiled with torch.compile (speed only; the result is the same)"),
    "dynamo_backend": msg("read only with torch_compile, which LoRA Train does not use"),
    "persistent_data_loader_workers": msg("the threads that load images (max_data_loader_n_workers) last the whole run either way"),
    "full_fp16": _PRECISION,
    "full_bf16": _PRECISION,
    "ddp_timeout": _DDP,
    "ddp_gradient_as_bucket_view": _DDP,
    "ddp_static_graph": _DDP,
    "log_config": msg("LoRA Train always saves the config of a run as a .toml beside its LoRA, and its settings in the ss_* metadata of the file"),
    "lowram": _MEMORY,
    "highvram": _MEMORY,
    "config_file": msg("LoRA Train reads the file given with --config; a config_file key inside a config is ignored, as in sd-scripts"),
    "output_config": msg("LoRA Train does not stop here: it trains, and saves the run's config as a .toml beside its LoRA"),
    "zero_stage": _DEEPSPEED_OPTION,
    "offload_optimizer_device": _DEEPSPEED_OPTION,
    "offload_optimizer_nvme_path": _DEEPSPEED_OPTION,
    "offload_param_device": _DEEPSPEED_OPTION,
    "offload_param_nvme_path": _DEEPSPEED_OPTION,
    "zero3_init_flag": _DEEPSPEED_OPTION,
    "zero3_save_16bit_model": _DEEPSPEED_OPTION,
    "fp16_master_weights_and_gradients": _DEEPSPEED_OPTION,
    "fused_backward_pass": msg("a memory saving: LoRA Train steps the optimizer after the whole backward pass, which takes more memory"),
    "cpu_offload_checkpointing": msg("a memory saving: with gradient_checkpointing the saved activations stay on the GPU"),
    "disable_mmap_load_safetensors": msg("loading speed only: the checkpoint is loaded the way LoRA Train or the WebUI loads it"),
}

_FP8 = msg("keeps the base model in 8-bit floats to save VRAM, a GPU-only path LoRA Train does not have yet "
           "(and on a CPU there is no fp8 compute at all); remove it: the model stays in its own precision")

# key -> why a run cannot take it. Options that change the result are here until they are
# implemented: a note would let a run differ from sd-scripts' without the user deciding so.
REFUSED: dict[str, str] = {
    "face_crop_aug_range": _not_yet(msg("crop augmentation around faces (sd-scripts reads where each face is from the file "
                                        "names its face-detection tool writes; without that, use random_crop)")),
    "dataset_class": msg("a Python dataset class cannot be loaded from a config; use train_data_dir or dataset_config"),
    "fp8_base": _FP8,
    "fp8_base_unet": _FP8,
    "deepspeed": msg("DeepSpeed is not used: LoRA Train trains on several GPUs with accelerate launch, and a LoRA needs no ZeRO sharding"),
    "conditioning_data_dir": _not_yet(msg("mask images for masked_loss")),
    "masked_loss": _not_yet(msg("weighting the loss by a mask (alpha_mask or conditioning_data_dir)")),
}

# key -> (the config key it sets, the value it sets there or None for its own value, the note)
ALIASES: dict[str, tuple[str, Any, str]] = {
    # sd-scripts reads the old spelling over the new one when both are given; so does this
    "caption_extention": ("caption_extension", None, msg("sd-scripts' old spelling, read as caption_extension")),
    "use_8bit_adam": ("optimizer_type", "AdamW8bit", msg("read as optimizer_type AdamW8bit")),
    "use_lion_optimizer": ("optimizer_type", "Lion", msg("read as optimizer_type Lion")),
    # sd-scripts turns cache_text_encoder_outputs on for it
    "cache_text_encoder_outputs_to_disk": ("cache_text_encoder_outputs", True, msg(
        "read as cache_text_encoder_outputs: the outputs are cached in memory for the run, not on disk")),
}

# sd-scripts' defaults that are not false, empty or 0: a config that writes them asks for nothing
DEFAULTS: dict[str, Any] = {
    "zero_stage": 2, "vae_batch_size": 1, "dynamo_backend": "inductor",
}


def known_keys() -> set[str]:
    return set(NOTED) | set(REFUSED) | set(ALIASES)


def is_inert(key: str, value: Any) -> bool:
    """The value asks for nothing: unset, off, empty, 0 or sd-scripts' default."""
    if value is None or value is False:
        return True
    if isinstance(value, str):
        text = value.strip().lower()
        return text in ("", "none", "false", "0") or (key in DEFAULTS and text == str(DEFAULTS[key]).lower())
    if isinstance(value, (list, tuple, dict)):
        return not value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0 or value == DEFAULTS.get(key)
    return False


def translate(flat: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """(`flat` with the compat keys taken out and aliases applied, the notes, the refused keys with
    their reasons). Keys that are neither compat keys nor aliases pass through untouched."""
    out: dict[str, Any] = {}
    noted: dict[str, list[str]] = {}  # note -> keys, so keys that share a note share a line
    refused: list[tuple[str, str]] = []
    set_by: dict[str, str] = {}  # config key -> the alias that set it
    for key, value in flat.items():
        if key not in ALIASES and key not in NOTED and key not in REFUSED:
            if key not in set_by:  # an alias's value wins, as in sd-scripts
                out[key] = value
            continue
        if is_inert(key, value):
            continue
        if key in REFUSED:
            refused.append((key, REFUSED[key]))
        elif key in NOTED:
            noted.setdefault(NOTED[key], []).append(key)
        else:
            target, fixed, note = ALIASES[key]
            new = value if fixed is None else fixed
            if target in set_by:
                other, existing = set_by[target], out[target]
            elif target in flat and not is_inert(target, flat[target]):
                other, existing = target, flat[target]
            else:
                other = existing = None
            if fixed is not None and other is not None and not _same(existing, new):
                # sd-scripts stops here too: two options choose the optimizer
                refused.append((key, msg("{other} is set too, to something else; keep one of them", other=other)))
                continue
            out[target] = new
            set_by[target] = key
            noted.setdefault(note, []).append(key)
    notes = [msg("{source}: {key}: {reason}", source=source, key=", ".join(keys), reason=note) for note, keys in noted.items()]
    return out, notes, refused


def _same(a: Any, b: Any) -> bool:
    return str(a).strip().lower() == str(b).strip().lower()
