"""The standalone host: no WebUI. Loads the model itself (a checkpoint file or `builtin:tiny`)."""

from __future__ import annotations

from lora_train.errors import UserError
from lora_train.model.ldm import LdmAdapter

BUILTIN_TINY = "builtin:tiny"  # random weights: shapes and plumbing
BUILTIN_TINYBASE = "builtin:tinybase"  # trained on generated scenes: learning can be seen


def load_model(spec: str):
    from lora_train.model.loading import load_checkpoint

    if spec == BUILTIN_TINY:
        from lora_train.model.tiny import build_tiny

        return build_tiny()
    if spec == BUILTIN_TINYBASE:
        from lora_train.testing.base import base_checkpoint

        return load_checkpoint(base_checkpoint())
    if spec.startswith("builtin:"):
        raise UserError(f"unknown built-in model '{spec}' (known: {BUILTIN_TINY}, {BUILTIN_TINYBASE})")
    return load_checkpoint(spec)


def load_adapter(spec: str, clip_skip: int | None = None) -> LdmAdapter:
    model = load_model(spec)
    return LdmAdapter(model, name="tiny" if spec == BUILTIN_TINY else None, clip_skip=clip_skip or 1)
