"""The base-style LoRA, in one step (the guides' SuperMerger recipe without SuperMerger).

A style LoRA also learns what the base model draws anyway. The guides subtract that: render the
style dataset's captions, trigger word removed, with the base model itself; train `NAME_BASE` on
those images with the run's own settings; then merge `NAME:1:GP1,NAME_BASE:-1:GP2`, GP1 keeping the
style's blocks and GP2 taking a little of the base's style out everywhere. `prepare` renders and
returns the `_BASE` run's config; whoever trains it (the CLI, the run manager) then calls `finish`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.app.reg_images import Renderer, RenderSettings, render_folder
from lora_train.dataset.scan import scan
from lora_train.dataset.source import spec_from_config
from lora_train.dataset.spec import parse_resolution
from lora_train.errors import UserError, msg
from lora_train.network.files import atomic_write_bytes
from lora_train.tools.cards import write_card
from lora_train.tools.merge import merge
from lora_train.train.config import TrainConfig

# the guide's presets (17 SD1 block weights: BASE, IN01-IN08, M00, OUT03-OUT11), editable by the caller
PRESETS = {
    "GP1": "1.0,0.6,0.9,0.9,0.9,0.6,0.5,0.4,0.4,0.6,0.8,1.0,1.1,1.1,1.1,1.1,1.1",
    "GP2": "0.3,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.2,0.2,0.2,0.2,0.2",
}
BASE_SUFFIX = "_BASE"
DISTILLED_SUFFIX = "-distilled"


def formula(name: str) -> str:
    return f"{name}:1:GP1,{name}{BASE_SUFFIX}:-1:GP2"


@dataclass
class BaseStyle:
    config: TrainConfig  # the _BASE run's: the style run's, on the rendered folder
    folder: Path  # the rendered images (train_data_dir of the _BASE run)
    source: Path  # the style LoRA the distilled file starts from
    triggers: list[str]
    prompts: list[str] = field(default_factory=list)


def triggers_of(config: TrainConfig, class_tokens: list[str]) -> list[str]:
    """The trigger words: the training folders' class tokens (`10_zkz` -> zkz) and the card's trigger phrase."""
    words = list(class_tokens) + [config.saving.metadata_trigger_phrase or ""]
    return list(dict.fromkeys(w.strip() for w in words if w and w.strip()))


def strip_triggers(caption: str, triggers: list[str]) -> str:
    """The caption without the trigger words (whole words, any case); tags left empty are dropped."""
    tags = []
    for tag in caption.split(","):
        for word in triggers:
            tag = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", tag, flags=re.IGNORECASE)
        tag = " ".join(tag.split())
        if tag:
            tags.append(tag)
    return ", ".join(tags)


def style_prompts(config: TrainConfig, n: int | None = None) -> tuple[list[str], list[str]]:
    """(prompts, triggers): the training images' captions without the trigger, in file order,
    repeated to `n` (default: one per training image)."""
    spec, _ = spec_from_config(config.dataset, 1, 512)
    items = sorted(scan(spec).train_items, key=lambda i: str(i.path))
    triggers = triggers_of(config, [i.subset.class_tokens or "" for i in items])
    captions = [strip_triggers(i.caption, triggers) for i in items]
    count = len(captions) if n is None else int(n)
    if count < 1:
        raise UserError(msg("base-style: N must be at least 1, got {n}", n=count))
    return [captions[i % len(captions)] for i in range(count)], triggers


def style_file(config: TrainConfig) -> Path:
    """NAME's trained file, which the distilled LoRA starts from: it must exist before anything is rendered."""
    path = Path(config.saving.output_dir) / f"{config.saving.output_name}.safetensors"
    if not path.is_file():
        raise UserError(msg("base-style: {path} does not exist: train '{name}' first (the distilled LoRA is {formula})",
                            path=path, name=config.saving.output_name, formula=formula(config.saving.output_name)))
    return path


def base_config(config: TrainConfig, folder: Path) -> TrainConfig:
    """The style run's settings, trained on `folder` alone, saved as NAME_BASE."""
    base = copy.deepcopy(config)
    d = base.dataset
    d.train_data_dir, d.dataset_config, d.in_json, d.reg_data_dir = str(folder), None, None, None
    # every rendered image trains: holding some out would only shrink _BASE (its epochs are not picked by loss)
    d.validation_split = 0.0
    s = base.saving
    s.output_name = config.saving.output_name + BASE_SUFFIX
    s.save_model_as = "safetensors"  # merge reads safetensors
    s.resume, s.metadata_trigger_phrase = None, None
    base.network.network_weights = None  # NAME's own weights would start _BASE from the style
    return base


def prepare(config: TrainConfig, renderer: Renderer, model_key: str, cache: str | Path, n: int | None = None,
            settings: RenderSettings | None = None, resolution: int = 512, log=None) -> BaseStyle:
    """Render the _BASE LoRA's images (or reuse them) and return its run."""
    source = style_file(config)
    prompts, triggers = style_prompts(config, n)
    if settings is None:
        width, height = parse_resolution(config.dataset.resolution, resolution)
        settings = RenderSettings(width=width, height=height, seed=config.training.seed or 1)
    folder = render_folder(renderer, model_key, prompts, settings, cache, config.saving.output_name + BASE_SUFFIX, 1, log)
    return BaseStyle(base_config(config, folder), folder, source, triggers, prompts)


def base_note(plan: BaseStyle) -> str:
    """The _BASE LoRA's card notes: what it was trained on."""
    return msg("trained on {count} images the base model rendered itself ({folder}) from the captions of "
               "'{name}' without its trigger words ({triggers}): the base model's own style",
               count=len(plan.prompts), folder=plan.folder, name=plan.source.stem, triggers=", ".join(plan.triggers) or "-")


def finish(plan: BaseStyle, base_file: Path, family: str | None = None, presets: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """After NAME_BASE trained: its card, and `NAME-distilled` = NAME:1:GP1,NAME_BASE:-1:GP2 beside NAME."""
    base_file = Path(base_file)
    write_card(base_file, family, base_note(plan))
    name = plan.source.stem
    beside = plan.source.with_name(f"{name}{BASE_SUFFIX}.safetensors")
    if not (beside.is_file() and beside.samefile(base_file)):
        # trained in a folder of its own (the run manager's, maybe renamed NAME_BASE_2): the formula
        # reads both LoRAs from NAME's folder, so a copy of this one is put there under the name it uses
        atomic_write_bytes(beside, base_file.read_bytes())
    output = plan.source.with_name(f"{name}{DISTILLED_SUFFIX}.safetensors")
    return merge(formula(name), output, {**PRESETS, **(presets or {})}, lora_dir=plan.source.parent)
