"""The standalone host: no WebUI. Loads the model itself (a checkpoint file or a built-in tiny one)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from lora_train.access import AccessPolicy
from lora_train.errors import UserError
from lora_train.host.base import Host
from lora_train.model.adapter import ModelAdapter
from lora_train.model.select import adapter_for

BUILTIN_TINY = "builtin:tiny"  # random weights: shapes and plumbing
BUILTIN_TINYBASE = "builtin:tinybase"  # trained on generated scenes: learning can be seen
BUILTIN_TINY_SDXL = "builtin:tiny-sdxl"  # SDXL architecture, random weights (sgm when importable)
BUILTINS = (BUILTIN_TINY, BUILTIN_TINYBASE, BUILTIN_TINY_SDXL)


def load_model(spec: str):
    from lora_train.model.loading import load_checkpoint

    if spec == BUILTIN_TINY:
        from lora_train.model.tiny import build_tiny

        return build_tiny()
    if spec == BUILTIN_TINYBASE:
        from lora_train.testing.base import base_checkpoint

        return load_checkpoint(base_checkpoint())
    if spec == BUILTIN_TINY_SDXL:
        from lora_train.model.sgm_import import sgm_available
        from lora_train.model.tiny_sdxl import build_tiny_sdxl

        return build_tiny_sdxl(sgm=sgm_available())
    if spec.startswith("builtin:"):
        raise UserError(f"unknown built-in model '{spec}' (known: {', '.join(BUILTINS)})")
    return load_checkpoint(spec)


def _name(spec: str) -> str | None:
    return spec.split(":", 1)[1] if spec in BUILTINS and spec != BUILTIN_TINYBASE else None


def load_adapter(spec: str, clip_skip: int | None = None) -> ModelAdapter:
    return adapter_for(load_model(spec), name=_name(spec), clip_skip=clip_skip or 1)


def resolution_of(spec: str) -> int:
    # the built-in models are 64 px models; a file's own size is only known once it is loaded
    return 64 if spec in BUILTINS else 512


class StandaloneHost(Host):
    """Loads one model once and keeps it, like the WebUI keeps its checkpoint loaded; runs train on it
    one at a time. Previews come from our own sampler."""

    name = "standalone"

    def __init__(self, model: str, lora_dir: Path, work_dir: Path, access: AccessPolicy | None = None):
        self.model_spec = model
        self._access = access or AccessPolicy()
        self._lora_dir = Path(lora_dir)
        self._work_dir = Path(work_dir)
        self._lock = threading.Lock()  # the standalone "queue lock"
        self._loaded = None
        self.adapter: ModelAdapter | None = None

    def model_label(self) -> str:
        return self.model_spec

    def model_resolution(self) -> int:
        return resolution_of(self.model_spec)

    def model_family(self) -> str | None:
        if self.model_spec == BUILTIN_TINY_SDXL:
            return "sdxl"
        if self.model_spec in BUILTINS:
            return "sd1"
        return self.adapter.info.family if self.adapter is not None else None

    def lora_dir(self) -> Path:
        return self._lora_dir

    def work_dir(self) -> Path:
        return self._work_dir

    def access(self) -> AccessPolicy:
        return self._access

    def _model(self):
        if self._loaded is None:  # loaded once, on first use, like the WebUI keeps its checkpoint
            self._loaded = load_model(self.model_spec)
        return self._loaded

    @contextlib.contextmanager
    def session(self, config, run_id):
        with self._lock:
            self.adapter = adapter_for(self._model(), name=_name(self.model_spec), clip_skip=config.model.clip_skip or 1)
            yield self.adapter

    def sample_fn(self, config, adapter, prompts, folder):
        from lora_train.sample.previews import preview_prompts, sample_stem
        from lora_train.sample.render import render, save_sample

        parsed = preview_prompts(prompts, config.sampling.sample_sampler, self.model_resolution(), 20)
        name = config.saving.output_name

        def sample(epoch: int, step: int) -> list[Path]:
            paths = []
            for i, prompt in enumerate(parsed):
                image = render(adapter, prompt, default_seed=config.training.seed or 1)
                path = Path(folder) / f"{sample_stem(name, epoch, step, i)}.png"
                paths.append(save_sample(image, path, prompt, {"Lora": name, "Epoch": epoch, "Step": step}))
            return paths

        return sample

    def after_publish(self, path: Path) -> list[str]:
        from lora_train.network.selftest import self_test_message, unmatched_modules

        if self.adapter is None:
            return []
        return [self_test_message(path, unmatched_modules(path, self.adapter))]

    def xyz_grid(self, files, weights, prompt, seed, out):
        from lora_train.ui.grid import render_grid

        with self._lock:
            return render_grid(adapter_for(self._model()), files, weights, prompt, seed, out, size=self.model_resolution())
