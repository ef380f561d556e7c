"""The model's memory before a run: base weights back from the built-in Lora extension's in-place
merges, and --medvram (what a run changes, and the UNet pinned on the GPU)."""

from __future__ import annotations

from lora_train.errors import UserError, msg


def medvram(model) -> bool:
    from modules import shared

    cmd = shared.cmd_opts
    return not getattr(cmd, "lowvram", False) and bool(getattr(cmd, "medvram", False) or getattr(model, "lowvram", False))


def medvram_config(config) -> list[str]:
    """What a run changes under --medvram so that only the UNet runs during the steps; returns the
    notes that tell the user."""
    from lora_train.train.loop import captions_change

    n, t, d = config.network, config.training, config.dataset
    notes = []
    if not n.network_train_unet_only:
        n.network_train_unet_only, n.network_train_text_encoder_only = True, False
        notes.append(msg("--medvram: training the UNet only (the text encoder would be swapped onto the GPU at every step)"))
    if not (d.cache_latents or d.cache_latents_to_disk):
        if d.random_crop or d.color_aug:
            notes.append(msg("--medvram: random_crop / color_aug change the pixels every step, so latents cannot be cached: "
                             "the VAE is swapped in at every step, which is slow"))
        else:
            d.cache_latents = True
            notes.append(msg("--medvram: latents are cached before the first step"))
    if not t.cache_text_encoder_outputs:
        if captions_change(d) or d.dataset_config:
            notes.append(msg("--medvram: captions change between steps (shuffle, dropout, wildcards, token warm-up) or come from a dataset "
                             "config, so text-encoder outputs are not cached: the text encoder is swapped in at every step, which is slow"))
        else:
            t.cache_text_encoder_outputs = True
            notes.append(msg("--medvram: text-encoder outputs are cached before the first step"))
    return notes


def pin_unet(model, device) -> None:
    """The reference notes' choreography: everything off the GPU, then the UNet on it, recorded as
    the module the WebUI's hooks believe is there (so its bookkeeping stays right)."""
    from modules import lowvram

    lowvram.send_everything_to_cpu()
    model.model.to(device)
    lowvram.module_in_gpu = model.model


def restore_lora_merges(model) -> int:
    """Put back the base weights the built-in Lora extension merged into `model` in place.

    The extension merges `<lora:...>` deltas into each layer's weight and remembers which set it
    merged (`network_current_names`), with a CPU backup of the original. Returns the number of
    layers restored; afterwards the next generation merges again from the backup.
    """
    layers = [m for m in model.modules() if getattr(m, "network_current_names", ())]
    try:
        import networks
    except ImportError:
        networks = None
    if layers and networks is None:
        raise UserError(msg("The model carries LoRA weights merged by the built-in Lora extension, which is not loaded "
                            "now, so they cannot be removed. Reload the checkpoint, then start again."))
    import torch

    with torch.no_grad():  # the WebUI calls it under no_grad; its weights still require grad
        for m in layers:
            networks.network_restore_weights_from_backup(m)
            m.network_current_names = ()
    if networks is not None:
        networks.loaded_networks.clear()
    return len(layers)
