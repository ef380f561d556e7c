"""Preview images during a run through Forge's own txt2img: the A1111 host's renderer (same
`processing` API), pinned to Forge's way of choosing a model."""

from __future__ import annotations

import contextlib


def sample_fn(host, config, adapter, prompts, folder):
    from lora_train.host.a1111 import previews

    return previews.sample_fn(host, config, adapter, prompts, folder, pinned=lambda: pinned(host, adapter.model))


@contextlib.contextmanager
def pinned(host, model):
    """While previews render: Forge keeps the model being trained (choosing a checkpoint replaces
    `forge_loading_parameters` at once and asks for a global unload, both acted on by the next
    generation), renders it without any LoRA of its own (a preview skips extra networks, so Forge would
    reuse the last prompt's LoRA patchers), and afterwards the weights are trainable again."""
    from modules import processing, sd_models

    from lora_train.host.forge.engine import lora_free
    from lora_train.host.forge.session import prepare

    data = sd_models.model_data
    wanted = getattr(host, "loading_parameters", None)
    chosen, unload = data.forge_loading_parameters, processing.need_global_unload
    if wanted is not None:
        data.forge_loading_parameters = wanted
    processing.need_global_unload = False
    lora_free(model)
    try:
        yield
    finally:
        if wanted is not None and data.forge_loading_parameters is wanted:
            data.forge_loading_parameters = chosen
        processing.need_global_unload = processing.need_global_unload or unload
        prepare(model)
