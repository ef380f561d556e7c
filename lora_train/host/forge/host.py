"""Forge as a Host: the A1111 host's folders, lock, progress and X/Y/Z grid (Forge keeps those WebUI
APIs), with Forge's own model, run session, previews and LoRA self-test."""

from __future__ import annotations

from pathlib import Path

from lora_train.errors import msg
from lora_train.host.a1111.host import A1111Host


class ForgeHost(A1111Host):
    name = "forge"

    def __init__(self):
        super().__init__()
        self.loading_parameters = None  # Forge's choice of model while a run holds it

    # -- what the tab shows ---------------------------------------------------------------------
    def model_label(self) -> str:
        from lora_train.host.forge.engine import checkpoint_label, loaded_model

        try:
            model = loaded_model()
            label = checkpoint_label(model)
        except Exception:
            return msg("(WebUI model unavailable)")
        if label is None:
            return msg("no checkpoint loaded")
        return label if model is not None else msg("{checkpoint} (not loaded yet)", checkpoint=label)

    def model_family(self) -> str | None:
        from lora_train.host.forge.engine import loaded_model
        from lora_train.model.forge import forge_family

        try:
            model = loaded_model()
        except Exception:
            return None
        return None if model is None else forge_family(model)

    def model_resolution(self) -> int:
        return 1024 if self.model_family() in ("sdxl", "sdxl_refiner", "sd3", "flux", "chroma") else 512

    # -- a run ------------------------------------------------------------------------------------
    def preflight(self, config) -> list[str]:
        from lora_train.host.forge.refusals import preflight

        return preflight(config)

    def session(self, config, run_id: str):
        from lora_train.host.forge.session import session

        return session(self, config, run_id)

    def sample_fn(self, config, adapter, prompts, folder):
        from lora_train.host.forge.previews import sample_fn

        return sample_fn(self, config, adapter, prompts, folder)

    # -- after a save ------------------------------------------------------------------------------
    def self_test(self, path: Path) -> str:
        from lora_train.host.forge.selftest import self_test

        return self_test(path)

    def lora_files_changed(self) -> None:
        from lora_train.host.forge.selftest import forget_cached

        super().lora_files_changed()
        forget_cached()

    # -- the model's own images ----------------------------------------------------------------------
    def txt2img(self, prompts) -> list:
        from lora_train.host.a1111.txt2img import txt2img
        from lora_train.host.forge.engine import load_model, lora_free

        def prepare(_placeholder):
            model = load_model()
            if model is not None:
                lora_free(model)

        return txt2img(self, prompts, prepare=prepare)
