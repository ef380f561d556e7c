"""Which model a name means, outside a host that holds one: a checkpoint file, or a built-in tiny model.

The CLI, the standalone host and the test kit load models only through here, so the `builtin:*`
names mean the same thing everywhere.
"""

from __future__ import annotations

from lora_train.errors import UserError, msg
from lora_train.model.adapter import ModelAdapter
from lora_train.model.select import adapter_for

BUILTIN_TINY = "builtin:tiny"  # random weights: shapes and plumbing
BUILTIN_TINYBASE = "builtin:tinybase"  # trained on generated scenes: learning can be seen
BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"  # SDXL architecture, random weights (sgm when importable)
BUILTINS = (BUILTIN_TINY, BUILTIN_TINYBASE, BUILTIN_TINY_SDXL)


MODEL_MISSING = ("pretrained_model_name_or_path is not set: name the checkpoint to train on, a .safetensors or "
                 ".ckpt file (for SD2 without its .yaml beside it, also set v2 and v_parameterization), a Hugging "
                 "Face id (owner/name), or a built-in test model (builtin:tiny, "
                 "builtin:tinybase, builtin:tiny-sdxl); in the config's [model] section, or with "
                 "--set pretrained_model_name_or_path=PATH")


def load_model(spec: str | None, v2: bool = False, v_parameterization: bool = False, vae: str | None = None):
    """The model `spec` names: a built-in one, a checkpoint file or a Hugging Face id. `v2` /
    `v_parameterization` are read for a checkpoint without a .yaml; `vae` replaces its VAE. What
    loading decided is in the model's `load_notes`."""
    model = _load(spec, v2, v_parameterization)
    if spec in BUILTINS and (v2 or v_parameterization):
        model.load_notes = [msg("v2 and v_parameterization are not read for the built-in test models (eps models of SD1 or SDXL shape)")]
    if vae:
        from lora_train.model.vae_file import load_vae

        model.load_notes = [*getattr(model, "load_notes", []), *load_vae(model, vae)]
    return model


def _load(spec: str | None, v2: bool, v_parameterization: bool):
    from lora_train.model import hub
    from lora_train.model.loading import load_checkpoint

    if not spec:
        raise UserError(msg(MODEL_MISSING))
    if spec == BUILTIN_TINY:
        from lora_train.model.tiny import build_tiny

        return build_tiny()
    if spec == BUILTIN_TINYBASE:
        from lora_train.model.tinybase import base_checkpoint

        return load_checkpoint(base_checkpoint())
    if spec == BUILTIN_TINY_SDXL:
        from lora_train.model.sgm_import import sgm_available
        from lora_train.model.tiny_sdxl import build_tiny_sdxl

        return build_tiny_sdxl(sgm=sgm_available())
    if spec.startswith("builtin:"):
        raise UserError(msg("unknown built-in model '{name}' (known: {known})", name=spec, known=", ".join(BUILTINS)))
    if hub.is_hub_id(spec):
        spec = str(hub.fetch(spec, "pretrained_model_name_or_path"))
    return load_checkpoint(spec, v2=v2, v_parameterization=v_parameterization)


def display_name(spec: str) -> str | None:
    """The name a built-in model gives its adapter (and so ss_sd_model_name); None = the file's own."""
    return spec.split(":", 1)[1] if spec in BUILTINS and spec != BUILTIN_TINYBASE else None


def load_adapter(spec: str | None, clip_skip: int | None = None, model_config=None) -> ModelAdapter:
    """`model_config`: the run's [model] section (v2, v_parameterization, vae, no_half_vae)."""
    model = load_model(spec, **loading_options(model_config))
    return with_options(adapter_for(model, name=display_name(spec), clip_skip=clip_skip or 1), model_config)


def loading_options(model_config) -> dict:
    """The [model] keys that decide how a file loads (a host that loads files keeps one model per set)."""
    get = (lambda key: None) if model_config is None else (lambda key: getattr(model_config, key))
    return {"v2": bool(get("v2")), "v_parameterization": bool(get("v_parameterization")), "vae": get("vae") or None}


def with_options(adapter: ModelAdapter, model_config) -> ModelAdapter:
    """The [model] keys the adapter reads while training."""
    adapter.vae_fp32 = bool(model_config is not None and model_config.no_half_vae)
    return adapter


def resolution_of(spec: str) -> int:
    # the built-in models are 64 px models; a file's own size is only known once it is loaded
    return 64 if spec in BUILTINS else 512


def family_of(spec: str) -> str | None:
    """"sd1" | "sdxl" for the built-in models; None for a file until it is loaded."""
    if spec == BUILTIN_TINY_SDXL:
        return "sdxl"
    return "sd1" if spec in BUILTINS else None
