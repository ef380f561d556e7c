"""The adapter for a loaded model: sgm's SDXL engine or an ldm SD1/SD2 model."""

from __future__ import annotations

import torch

from lora_train.errors import msg
from lora_train.model.adapter import ModelAdapter


def adapter_for(model, name: str | None = None, clip_skip: int | None = 1, device: torch.device | None = None) -> ModelAdapter:
    from lora_train.model.sgm import SgmAdapter, is_sdxl

    if is_sdxl(model):
        adapter = SgmAdapter(model, name=name, device=device)
        if clip_skip and clip_skip > 1:
            # sd-scripts ignores it for SDXL too: SDXL is trained on fixed layers of both encoders
            adapter.info.notes.append(msg("clip_skip {value} is ignored on SDXL (it always reads the penultimate layers of the encoders)", value=clip_skip))
        return adapter
    from lora_train.model.ldm import LdmAdapter

    return LdmAdapter(model, name=name, clip_skip=clip_skip or 1, device=device)
