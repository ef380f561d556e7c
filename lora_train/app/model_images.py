"""The Train tab's images made by the host's own model (issue 21): regularization images for the form's
`reg_data_dir`, and the base-style LoRA (NAME_BASE trained through the run manager, then NAME-distilled
published into the LoRA folder). The rendering and the merge are `reg_images.py` and `base_style.py`;
this file adds what a tab needs around them: the model must be free (a run holds it while it trains),
every path goes through the folder policy of a listening WebUI, and the distilled LoRA is published
with its card as a run's save is.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

from lora_train.app import base_style
from lora_train.app.guard import guard_config, guarded_path
from lora_train.app.reg_images import RenderSettings, reg_images
from lora_train.app.runs import RunManager, RunRequest, RunStatus
from lora_train.dataset.spec import parse_resolution
from lora_train.errors import UserError, msg
from lora_train.network.card import SD_VERSION, Card, free_stem, publish, safe_name
from lora_train.train.config import TrainConfig

# under the host's work folder, beside the runs: one cache for every run, since it is keyed by the
# model, the prompt and the render settings (a run's own folder would render the same images again per name)
REG_CACHE = "reg-images"
BASE_CACHE = "base-style-images"  # under NAME's run folder, where the CLI keeps them too

Log = Optional[Callable[[str], None]]


def whole(value, what: str, key: str, default: Optional[int] = None) -> Optional[int]:
    """A number or text field holding a whole number; empty is `default`."""
    if value is None or str(value).strip() == "":
        return default
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if number != number or number != int(number):
        raise UserError(msg("{where}: '{key}' must be a whole number, not {value}", where=what, key=key, value=value))
    return int(number)


class ModelImages:
    def __init__(self, manager: RunManager):
        self.manager = manager
        self.host = manager.host

    def model_free(self) -> None:
        """Refuse while a run holds the model: the WebUI's txt2img would wait for the whole run (or,
        standalone, block on the host's lock), with nothing on the page saying why."""
        if getattr(self.host, "owner_thread", None) is not None or self.manager.running() is not None:
            raise UserError(msg("A training run is using the model right now: render the images when it has finished (or stop it)."))

    def settings(self, resolution: str, seed) -> RenderSettings:
        """The form's training size (empty: the model's) and seed (empty: 1); image i gets seed + i."""
        text = str(resolution or "").strip() or None
        width, height = parse_resolution(text, self.host.model_resolution())
        return RenderSettings(width=width, height=height, seed=whole(seed, msg("regularization images"), "seed", 1))

    def reg_images(self, class_prompt: str, n, repeats, resolution: str, seed, log: Log = None) -> Path:
        """N images of the class prompt (or those rendered before): the folder for `reg_data_dir`."""
        what = msg("regularization images")
        count, times = whole(n, what, "N", 0), whole(repeats, what, "repeats", 1)
        settings = self.settings(resolution, seed)
        self.model_free()
        cache = guarded_path(self.host.access(), self.host.work_dir() / REG_CACHE, what)
        return reg_images(self.host.txt2img, self.host.model_key(), class_prompt, count, settings, cache, times, log)

    def base_style(self, config: TrainConfig, trigger: str, n, presets: dict[str, str], log: Log = None) -> RunStatus:
        """Render NAME_BASE's images and start it; when it finishes, NAME-distilled is written and published."""
        from lora_train.tools import lbw

        count = whole(n, msg("base-style"), "N")
        config = copy.deepcopy(config)
        name = safe_name(config.saving.output_name or "lora")
        # where the run manager trains NAME (it keeps every run in the host's work folder)
        config.saving.output_name, config.saving.output_dir = name, str(self.host.work_dir() / name)
        guard_config(config, self.host.access())
        base_style.style_file(config)  # NAME trained? before the model is asked for anything
        family = self.host.model_family()
        for key, values in presets.items():  # a wrong preset is said now, not after the training
            lbw.parse_weights(values, family == "sdxl", what=key)
        self.model_free()
        cache = guarded_path(self.host.access(), Path(config.saving.output_dir) / BASE_CACHE, msg("base-style"))
        plan = base_style.prepare(config, self.host.txt2img, self.host.model_key(), cache, count,
                                  resolution=self.host.model_resolution(), log=log)
        request = RunRequest(plan.config, previews=False, notes=base_style.base_note(plan),
                             after=lambda status: self.distil(plan, status, family, presets, trigger))
        return self.manager.submit(request, start=True)

    def distil(self, plan: base_style.BaseStyle, status: RunStatus, family: Optional[str], presets: dict[str, str],
               trigger: str) -> list[str]:
        """After NAME_BASE finished: NAME-distilled beside NAME, and its copy in the LoRA folder with a card
        that keeps NAME's trigger word (the distilled LoRA is the style, still called by it)."""
        base_file = Path(status.work_dir) / f"{status.name}.safetensors"
        path, notes = base_style.finish(plan, base_file, family, presets)
        written = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")).get("notes", "")
        weights = [msg("block weights {name}: {values}", name=key, values=values) for key, values in presets.items()]
        card = Card(activation_text=trigger, sd_version=SD_VERSION.get(family or "", "SD1"), notes="\n".join([written, *weights]))
        folder = self.host.lora_dir()
        published = publish(path, folder, free_stem(folder, path.stem), card)  # never over an earlier one
        checks = self.host.after_publish(published)
        return [msg("wrote {path} = {formula}", path=published, formula=base_style.formula(plan.source.stem)), *notes, *checks]
