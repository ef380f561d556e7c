"""What Forge has now: its loaded model (the "engine"), the checkpoint it would load, and its LoRA state."""

from __future__ import annotations


def loaded_model():
    """Forge's loaded engine, or None: until its first generation Forge holds a placeholder
    (`FakeInitialModel`) with no `forge_objects`."""
    from modules import sd_models

    model = sd_models.model_data.sd_model
    return model if hasattr(model, "forge_objects_original") else None


def chosen_checkpoint():
    """The checkpoint Forge loads on its next generation (`forge_loading_parameters`), or None."""
    from modules import sd_models

    return (sd_models.model_data.forge_loading_parameters or {}).get("checkpoint_info")


def load_model():
    """Load the chosen checkpoint if it is not loaded yet (call under queue_lock); the engine or None."""
    from modules import sd_models

    if chosen_checkpoint() is None:
        return loaded_model()
    sd_models.forge_model_reload()
    return loaded_model()


def lora_free(model) -> None:
    """Forge's model without LoRA: the next generation starts from the LoRA-free patchers, and one that
    skips extra networks (our previews) does not reuse the last prompt's LoRA patchers."""
    model.forge_objects = model.forge_objects_original.shallow_copy()
    model.forge_objects_after_applying_lora = model.forge_objects_original.shallow_copy()
    model.current_lora_hash = str([])


def restore_base_weights(model) -> None:
    """Put back the weights Forge merged LoRAs into (they stay merged until a LoRA-free sampling)."""
    from backend import memory_management

    objects = model.forge_objects_original
    patchers = [objects.unet, objects.clip.patcher, objects.vae.patcher]
    memory_management.load_models_gpu(patchers)  # loads each at its LoRA-free state (refresh_loras)
    for patcher in patchers[:2]:
        patcher.refresh_loras()  # already loaded ones are not refreshed by the call above
    lora_free(model)


def device():
    from backend import memory_management

    return memory_management.get_torch_device()


def checkpoint_label(model=None) -> str | None:
    info = getattr(model, "sd_checkpoint_info", None) if model is not None else None
    info = info or chosen_checkpoint()
    return getattr(info, "title", None) or getattr(info, "name", None) if info is not None else None
