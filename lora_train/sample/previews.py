"""Preview samples during training (sd-scripts' sample_every_n_epochs / _steps), for the CLI host."""

from __future__ import annotations

from pathlib import Path

from lora_train.sample.prompts import load_prompts
from lora_train.sample.render import render, save_sample
from lora_train.train.config import TrainConfig


def preview_fn(config: TrainConfig, adapter):
    """A `sample_fn(epoch, step)` for the Trainer, or None when no prompts are configured."""
    sm = config.sampling
    if not sm.sample_prompts or not (sm.sample_every_n_epochs or sm.sample_every_n_steps or sm.sample_at_first):
        return None
    prompts = load_prompts(sm.sample_prompts, default_sampler=sm.sample_sampler)  # read now: a bad file fails before training
    folder = Path(config.saving.output_dir) / "sample"
    name = config.saving.output_name

    def sample(epoch: int, step: int) -> list[Path]:
        paths = []
        for i, prompt in enumerate(prompts):
            image = render(adapter, prompt, default_seed=config.training.seed)
            path = folder / f"{name}_e{epoch:06d}_s{step:06d}_{i:02d}_{image.info.get('seed', 0)}.png"
            paths.append(save_sample(image, path, prompt, {"Lora": name, "Epoch": epoch, "Step": step}))
        return paths

    return sample
