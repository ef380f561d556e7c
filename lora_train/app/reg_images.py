"""Images the base model makes itself, as a kohya image folder: regularization images for any run
(`reg_data_dir`), and the base-style LoRA's training images (`app/base_style.py`).

They are rendered by the host's own txt2img (the WebUI's in the WebUI, our sampler standalone), image
i with seed + i, and kept in a folder named by a hash of everything that decides the pixels (model,
prompts, size, seed, sampler, steps, CFG): asking again reuses them, and an interrupted render
renders only the images still missing. Layout: `<cache>/<key>/<repeats>_<class>/NNNNN.png` with a
`.txt` caption (the image's prompt) each, and `<cache>/<key>/reg.json` saying what they were made of.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lora_train.errors import UserError, msg
from lora_train.network.files import atomic_write_bytes
from lora_train.sample.prompts import SamplePrompt
from lora_train.sample.render import save_sample

Renderer = Callable[[list[SamplePrompt]], list]  # prompts -> PIL images, one each (Host.txt2img)
RECORD = "reg.json"


@dataclass
class RenderSettings:
    width: int = 512
    height: int = 512
    seed: int = 1
    sampler: str = "euler_a"
    steps: int = 20
    scale: float = 7.0
    negative: str = ""


def class_folder_name(repeats: int, class_prompt: str) -> str:
    """`<repeats>_<class>`: the class is the prompt, less what a file name cannot hold."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', " ", class_prompt)
    name = " ".join(name.split())[:80].strip(" .") or "class"
    return f"{int(repeats)}_{name}"


def cache_key(model_key: str, prompts: list[str], settings: RenderSettings) -> str:
    text = json.dumps({"model": model_key, "prompts": prompts, **asdict(settings)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def render_folder(renderer: Renderer, model_key: str, prompts: list[str], settings: RenderSettings, cache: str | Path,
                  class_name: str, repeats: int = 1, log=None) -> Path:
    """Render one image per prompt (or reuse the cached ones) and return the folder to pass as
    `reg_data_dir` / `train_data_dir` (it holds the `<repeats>_<class>` folder)."""
    if not prompts:
        raise UserError(msg("no prompts to render images from"))
    if repeats < 1:
        raise UserError(msg("repeats must be at least 1, got {repeats}", repeats=repeats))
    root = Path(cache) / cache_key(model_key, prompts, settings)
    folder = root / class_folder_name(repeats, class_name)
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():  # the same images asked for with other repeats: rename, not re-render
        if other.is_dir() and other != folder and other.name.split("_", 1)[-1] == folder.name.split("_", 1)[-1]:
            other.rename(folder)
    folder.mkdir(exist_ok=True)
    wanted = [(i, p) for i, p in enumerate(prompts) if not (folder / f"{i:05d}.png").is_file()]
    if wanted:
        if log:
            log(msg("rendering {count} images with the base model into {folder}", count=len(wanted), folder=folder))
        sample_prompts = [_sample_prompt(p, settings, settings.seed + i) for i, p in wanted]
        images = renderer(sample_prompts)
        if len(images) != len(sample_prompts):
            raise UserError(msg("the renderer returned {got} images for {wanted} prompts", got=len(images), wanted=len(sample_prompts)))
        for (i, prompt), sp, image in zip(wanted, sample_prompts, images):
            # the caption first: an image without its caption would train on the class token alone
            atomic_write_bytes(folder / f"{i:05d}.txt", prompt.encode("utf-8"))
            save_sample(image, folder / f"{i:05d}.png", sp, {"Model": model_key})
    elif log:
        log(msg("reusing {count} images rendered before in {folder}", count=len(prompts), folder=folder))
    record = {"model": model_key, "class": class_name, "repeats": repeats, "images": len(prompts), **asdict(settings),
              "prompts": sorted(set(prompts))}
    atomic_write_bytes(root / RECORD, json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8"))
    return root


def _sample_prompt(prompt: str, s: RenderSettings, seed: int) -> SamplePrompt:
    return SamplePrompt(prompt, s.negative, s.width, s.height, seed, s.steps, s.scale, s.sampler)


def reg_images(renderer: Renderer, model_key: str, class_prompt: str, n: int, settings: RenderSettings, cache: str | Path,
               repeats: int = 1, log=None) -> Path:
    """N images of one class prompt ("a photo of a girl"), seeds seed..seed+N-1: a `reg_data_dir`."""
    class_prompt = (class_prompt or "").strip()
    if not class_prompt:
        raise UserError(msg("regularization images: the class prompt is empty"))
    if n < 1:
        raise UserError(msg("regularization images: N must be at least 1, got {n}", n=n))
    return render_folder(renderer, model_key, [class_prompt] * int(n), settings, cache, class_prompt, repeats, log)
