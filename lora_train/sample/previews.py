"""Preview samples during training (sd-scripts' sample_every_n_epochs / _steps), for the CLI host."""

from __future__ import annotations

import re
from pathlib import Path

from lora_train.sample.prompts import SamplePrompt, load_prompts, parse_prompt_line
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
            path = folder / f"{sample_stem(name, epoch, step, i)}_{image.info.get('seed', 0)}.png"
            paths.append(save_sample(image, path, prompt, {"Lora": name, "Epoch": epoch, "Step": step}))
        return paths

    sample.prompts = prompts  # what each sample event renders: the estimate prices it
    return sample


_SAMPLE = re.compile(r"_e(\d+)_s(\d+)_(\d+)")


def sample_stem(name: str, epoch: int, step: int, index: int) -> str:
    """`<name>_e<epoch>_s<step>_<n>`, as sd-scripts names its samples."""
    return f"{name}_e{epoch:06d}_s{step:06d}_{index:02d}"


def sample_epoch_step(path: str | Path) -> tuple[int, int] | None:
    """(epoch, step) read back from a sample's file name."""
    m = _SAMPLE.search(Path(path).stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


def preview_prompts(lines: list[str], default_sampler: str, size: int, steps: int) -> list[SamplePrompt]:
    """Preview prompt lines for a host: the model's own size and the host's step count unless a
    line sets `--w`, `--h` or `--s` itself (sd-scripts' own defaults are for 512 px models)."""
    parsed = []
    for line in lines:
        p = parse_prompt_line(line, default_sampler=default_sampler)
        padded = f" {line} "
        if " --w " not in padded:
            p.width = size
        if " --h " not in padded:
            p.height = size
        if " --s " not in padded:
            p.steps = steps
        parsed.append(p)
    return parsed
