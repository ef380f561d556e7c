"""What the Train tab needs from wherever it runs: the WebUI (`a1111.py`) or nothing (`standalone.py`).

The run manager (`lora_train/app/runs.py`) talks to a Host only through this class, so the same tab
and the same tests serve both. A host never sees gradio; the tab never sees the host's modules.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional

from lora_train.access import AccessPolicy
from lora_train.model.adapter import ModelAdapter
from lora_train.train.config import TrainConfig

SampleFn = Callable[[int, int], list]  # (epoch, step) -> image paths, rendered with the LoRA applied


class Host:
    name = "host"

    def model_label(self) -> str:
        """The model the run would train on, as the tab shows it."""
        raise NotImplementedError

    def model_version(self) -> int:
        """Changes whenever the host loads a checkpoint (the tab then re-reads family and resolution)."""
        return 0

    def model_spec(self) -> str | None:
        """What `pretrained_model_name_or_path` names the host's model by (a file, a built-in name)."""
        return None

    def model_resolution(self) -> int:
        return 512

    def model_family(self) -> str | None:
        """"sd1" | "sd2" | "sdxl" of the model a run would train on, None while unknown (not loaded)."""
        return None

    def lora_dir(self) -> Path:
        """Where finished LoRA files are published (the host's `models/Lora`)."""
        raise NotImplementedError

    def work_dir(self) -> Path:
        """Where runs keep their state, samples, loss logs and configs (never the LoRA folder: the
        WebUI lists every .pt there as a network)."""
        raise NotImplementedError

    def access(self) -> AccessPolicy:
        """Which folders the Dataset tab may open, and whether it may move files or download
        models (a host reachable from other machines limits both)."""
        return AccessPolicy()

    def models_dir(self) -> Path:
        """Where taggers and captioners are looked for and downloaded to."""
        return self.work_dir() / "models"

    def preflight(self, config: TrainConfig) -> list[str]:
        """Reasons this run cannot start on this host now; empty when it can."""
        return []

    @contextlib.contextmanager
    def session(self, config: TrainConfig, run_id: str) -> Iterator[ModelAdapter]:
        """Hold the host for one run: lock out other users of the model, prepare it, yield an
        adapter over it, and on every exit leave it exactly as it was."""
        raise NotImplementedError
        yield  # pragma: no cover

    def sample_fn(self, config: TrainConfig, adapter: ModelAdapter, prompts: list[str], folder: Path) -> Optional[SampleFn]:
        """Preview renderer for the run, or None."""
        return None

    def on_event(self, event) -> None:
        """Every training event, for the host's own progress display."""

    def after_publish(self, path: Path) -> list[str]:
        """A LoRA was just published into `lora_dir()`: refresh the host's list and check the file
        loads there. Returns messages for the user (unmatched keys, ...)."""
        return []

    def lora_files_changed(self) -> None:
        """Files were removed from `lora_dir()`: refresh the host's list of LoRA files."""

    def txt2img(self, prompts: list) -> list:
        """The host's own txt2img on its model, no LoRA: one PIL image per `SamplePrompt` (the images a
        model makes itself: regularization images, the base-style LoRA's dataset)."""
        raise NotImplementedError

    def model_key(self) -> str:
        """Names the loaded weights in a cache of their renders: changes when the model does."""
        return self.model_label()

    def xyz_grid(self, files: list[Path], weights: list[float], prompt: str, seed: int, out: Path) -> Optional[Path]:
        """Render an epochs x weights comparison grid; None when the host cannot."""
        return None
