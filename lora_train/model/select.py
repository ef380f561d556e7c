"""The adapter for a loaded model: sgm's SDXL engine or an ldm SD1/SD2 model."""

from __future__ import annotations

import torch

from lora_train.errors import msg
from lora_train.model.adapter import ModelAdapter


def adapter_for(model, name: str | None = None, clip_skip: int | None = 1, device: torch.device | None = None) -> ModelAdapter:
    adapter = _adapter(model, name, clip_skip, device)
    adapter.info.notes += getattr(model, "load_notes", [])  # what our loader decided (loading.py)
    adapter.info.vae = getattr(model, "vae_file", None)
    return adapter


def _adapter(model, name, clip_skip, device) -> ModelAdapter:
    from lora_train.model.sgm import SgmAdapter, is_sdxl

    if is_sdxl(model):
        adapter = SgmAdapter(model, name=name, device=device)
        if clip_skip and clip_skip > 1:
            # sd-scripts ignores it for SDXL too: SDXL is trained on fixed layers of both encoders
            adapter.info.notes.append(msg("clip_skip {value} is ignored on SDXL (it always reads the penultimate layers of the encoders)", value=clip_skip))
        return adapter
    from lora_train.model.ldm import LdmAdapter

    return LdmAdapter(model, name=name, clip_skip=clip_skip or 1, device=device)


def hosted_notes(model_config, adapter: ModelAdapter) -> list[str]:
    """A host's own model is trained as the host loaded it: the [model] keys that load a file say so."""
    notes = []
    if model_config.vae:
        notes.append(msg("vae {name}: the WebUI's VAE is used (Settings > Stable Diffusion > SD VAE); choose the file there "
                         "to train with it", name=model_config.vae))
    if model_config.v2 and adapter.info.family != "sd2":
        notes.append(msg("v2 is set, but the WebUI's model is {family}: v2 ignored", family=adapter.info.family.upper()))
    if model_config.v_parameterization and adapter.prediction_type != "v":
        notes.append(msg("v_parameterization is set, but the WebUI's model predicts eps (as its .yaml says): trained as it is"))
    return notes
