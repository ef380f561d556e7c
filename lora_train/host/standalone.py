"""The standalone host: no WebUI. Loads the model itself (a checkpoint file or a built-in tiny one)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from lora_train.access import AccessPolicy
from lora_train.host.base import Host
from lora_train.model.adapter import ModelAdapter
from lora_train.model.registry import display_name, family_of, load_model, loading_options, resolution_of, with_options
from lora_train.model.select import adapter_for


class StandaloneHost(Host):
    """Loads one model once and keeps it, like the WebUI keeps its checkpoint loaded; runs train on it
    one at a time. Previews come from our own sampler."""

    name = "standalone"

    def __init__(self, model: str, lora_dir: Path, work_dir: Path, access: AccessPolicy | None = None):
        self._spec = model
        self._access = access or AccessPolicy()
        self._lora_dir = Path(lora_dir)
        self._work_dir = Path(work_dir)
        self._lock = threading.Lock()  # the standalone "queue lock"
        self._loaded = None
        self._loaded_with: dict | None = None  # the [model] keys it was loaded with
        self.adapter: ModelAdapter | None = None

    def model_label(self) -> str:
        return self._spec

    def model_spec(self) -> str:
        return self._spec

    def model_resolution(self) -> int:
        return resolution_of(self._spec)

    def model_family(self) -> str | None:
        family = family_of(self._spec)
        if family is None and self.adapter is not None:
            family = self.adapter.info.family
        return family

    def lora_dir(self) -> Path:
        return self._lora_dir

    def work_dir(self) -> Path:
        return self._work_dir

    def access(self) -> AccessPolicy:
        return self._access

    def _model(self, options: dict | None = None):
        # loaded once, on first use, like the WebUI keeps its checkpoint; again when a run asks for
        # another VAE or SD2 reading
        if options is None:
            options = self._loaded_with if self._loaded is not None else loading_options(None)
        if self._loaded is None or options != self._loaded_with:
            self._loaded = None
            self._loaded = load_model(self._spec, **options)
            self._loaded_with = options
        return self._loaded

    @contextlib.contextmanager
    def session(self, config, run_id):
        with self._lock:
            model = self._model(loading_options(config.model))
            self.adapter = with_options(adapter_for(model, name=display_name(self._spec), clip_skip=config.model.clip_skip or 1),
                                        config.model)
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

        sample.prompts = parsed  # what each sample event renders: the estimate prices it
        return sample

    def after_publish(self, path: Path) -> list[str]:
        from lora_train.network.selftest import self_test_message, unmatched_modules

        if self.adapter is None:
            return []
        return [self_test_message(path, unmatched_modules(path, self.adapter))]

    def txt2img(self, prompts):
        from lora_train.sample.render import render

        with self._lock:
            adapter = adapter_for(self._model(), name=display_name(self._spec))
            return [render(adapter, p) for p in prompts]

    def model_key(self) -> str:
        path = Path(self._spec)
        if path.is_file():  # path, size and time: a changed file is another model, without hashing gigabytes
            stat = path.stat()
            return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return self._spec

    def xyz_grid(self, files, weights, prompt, seed, out):
        from lora_train.sample.grid import render_grid

        with self._lock:
            return render_grid(adapter_for(self._model()), files, weights, prompt, seed, out, size=self.model_resolution())
