"""A published LoRA loaded by Forge's own LoRA loader: which of its keys Forge could not place.

Forge's `load_lora` consumes every key it maps onto the model (UNet map, then text-encoder map) and
returns the rest; those are the unmatched keys. Nothing is merged: the patches are only matched
against the model's parameter names (`add_patches` on clones). Forge caches LoRA files by name and
never invalidates, so a file published over an existing name is dropped from its cache first.
"""

from __future__ import annotations

from pathlib import Path

from lora_train.errors import msg


def forget_cached(path: Path | None = None) -> None:
    """Forge's cache of LoRA state dicts (keyed by file name) and its last-applied LoRA set."""
    try:
        import networks  # the built-in LoRA extension's module

        networks.load_lora_state_dict.cache_clear()
        networks.list_available_networks()
    except Exception:
        pass
    from lora_train.host.forge.engine import loaded_model

    model = loaded_model()
    if model is not None:
        model.current_lora_hash = str([])


def unmatched_keys(model, path: Path) -> list[str]:
    """The keys of the file at `path` Forge's loader leaves unmatched on `model`: unmapped keys, and
    mapped ones whose patch lands on no parameter."""
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from backend.utils import load_torch_file

    objects = model.forge_objects_original
    state = load_torch_file(str(path), safe_load=True)
    unet_patches, rest = load_lora(state, model_lora_keys_unet(objects.unet.model, {}))  # fresh maps: the default is shared
    clip_patches, rest = load_lora(rest, model_lora_keys_clip(objects.clip.cond_stage_model, {}))
    unmatched = set(rest)
    for patcher, patches in ((objects.unet, unet_patches), (objects.clip.patcher, clip_patches)):
        landed = patcher.clone().add_patches(filename=str(path), patches=patches)
        unmatched |= {f"{key} (patch)" for key in set(patches) - set(landed)}
    return sorted(unmatched)


def self_test(path: Path) -> str:
    from lora_train.host.forge.engine import loaded_model
    from lora_train.network.selftest import self_test_message

    forget_cached(path)
    model = loaded_model()
    if model is None:
        return msg("self-test skipped: no checkpoint is loaded to test {file} against", file=path.name)
    modules = sorted({key.partition(".")[0] for key in unmatched_keys(model, path)})
    return self_test_message(path, modules)
