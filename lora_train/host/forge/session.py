"""One run on Forge: the queue lock, the task the progress API reports, Forge's LoRA-free model made
trainable, and an adapter over it. The progress display is the A1111 host's (same `shared.state`)."""

from __future__ import annotations

import contextlib
import os

from lora_train.errors import UserError, msg
from lora_train.host.a1111.webui import opt
from lora_train.host.forge.refusals import preflight


def prepare(model) -> None:
    """Forge's LoRA-free weights on its device, as normal (not inference) tensors: what training needs.
    Again after every preview: a generation may move or merge weights under inference mode."""
    from lora_train.host.forge.engine import restore_base_weights
    from lora_train.model.forge_train import float32_embeddings, own_weights

    restore_base_weights(model)
    objects = model.forge_objects_original
    float32_embeddings(objects.clip.cond_stage_model)  # as Forge's first generation would: fp32 captions
    own_weights([objects.unet.model.diffusion_model, objects.clip.cond_stage_model])


@contextlib.contextmanager
def session(host, config, run_id: str):
    """Hold Forge for one run. The weights keep their values bit for bit: the adapter's hooks and block
    patches are removed when the run ends however it ends, and nothing writes into a weight."""
    from modules import shared

    from lora_train.host.a1111.session import holding
    from lora_train.host.forge.engine import device, load_model, loaded_model, lora_free
    from lora_train.model.forge import ForgeAdapter
    from lora_train.model.registry import with_options
    from lora_train.model.select import hosted_notes

    with holding(host, config, run_id):
        try:
            shared.state.textinfo = f"LoRA Train: loading the model for {host.run_name} ..."
            model = load_model()
            problems = preflight(config) or ([] if model is not None else [msg("No checkpoint is loaded.")])
            if problems:  # again: the model may have changed while we waited
                raise UserError("\n".join(problems))
            shared.state.textinfo = f"LoRA Train: preparing {host.run_name} ..."
            prepare(model)
            host.loading_parameters = _loading_parameters()
            filename = getattr(model, "filename", None)
            adapter = ForgeAdapter(model, name=os.path.basename(filename) if filename else None,
                                   clip_skip=int(opt("CLIP_stop_at_last_layers", 1) or 1), device=device(), path=filename)
            with_options(adapter, config.model)
            adapter.info.notes += hosted_notes(config.model, adapter)
            if adapter.info.family == "sdxl" and adapter.clip_skip > 1:
                adapter.info.notes.append(msg("clip_skip {value} is ignored on SDXL (it always reads the penultimate layers of the encoders)",
                                              value=adapter.clip_skip))
            yield adapter
        finally:
            host.loading_parameters = None
            if loaded_model() is not None:
                lora_free(loaded_model())  # the next prompt applies its own LoRAs again


def _loading_parameters():
    from modules import sd_models

    return sd_models.model_data.forge_loading_parameters
