"""BLIP captions through transformers (BlipForConditionalGeneration + BlipProcessor).

Lengths follow BLIP's own convention (and kohya's make_captions): `min_length` and `max_length`
count the whole decoded sequence, i.e. the bos token, the prompt's tokens and the caption's.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from lora_train.errors import UserError, close_match_hint, msg

MODELS = ("Salesforce/blip-image-captioning-large", "Salesforce/blip-image-captioning-base")
DEFAULT_MODEL = MODELS[0]


class Cancelled(Exception):
    """cancel() returned true between two batches."""


def _model_dir(repo_id: str, models_dir: Path) -> Path:
    return models_dir / repo_id.split("/")[-1]


def resolve_model(name_or_path: str | Path, models_dir: Path, *, allow_download: bool = True) -> Path:
    """A local folder as is; a known repo id as its folder under `models_dir`, downloaded there first
    if missing and allowed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path).strip()
    if name not in MODELS:
        raise UserError(msg("BLIP model {name}: no such folder, and not a known model ({known}){hint}", name=repr(name),
                            known=", ".join(MODELS), hint=close_match_hint(name, MODELS)))
    folder = _model_dir(name, Path(models_dir))
    if (folder / "config.json").is_file():
        return folder
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(msg("{folder} holds no config.json, so it is not a BLIP model; move it away to download {name} there",
                            folder=folder, name=name))
    if not allow_download:
        raise UserError(msg("BLIP model {name} is not in {folder} and downloading is refused here; "
                            "put the model folder there or choose a local folder", name=name, folder=folder))
    _download(name, folder)
    return folder


def _download(repo_id: str, folder: Path) -> None:
    from huggingface_hub import snapshot_download

    # A download lands beside the final folder and is renamed when complete, so an interrupted one
    # is resumed next time instead of being taken for a model.
    partial = folder.with_name(folder.name + ".partial")
    try:
        # Only one copy of the weights: the repos also hold TF weights, and some only a .bin.
        snapshot_download(repo_id, local_dir=str(partial), allow_patterns=["*.json", "*.txt", "*.safetensors"])
        if not any(partial.glob("*.safetensors")):
            snapshot_download(repo_id, local_dir=str(partial), allow_patterns=["*.bin"])
    except Exception as e:  # network, hub and disk errors all mean the same to the user
        raise UserError(msg("downloading the BLIP model {repo} into {folder} failed: {error}", repo=repo_id, folder=folder, error=e)) from e
    if folder.is_dir():
        folder.rmdir()  # empty (checked before downloading); rename() cannot replace it on Windows
    partial.rename(folder)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # convert("RGB") would put transparent pixels on black; captions expect them on white
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


class BlipCaptioner:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device, self.dtype = device, dtype
        source = str(model)
        path = Path(model).expanduser()
        if path.is_dir():
            _check_folder(path)
            source = str(path)
        elif isinstance(model, Path) or path.is_absolute() or source.startswith((".", "~")):
            raise UserError(msg("BLIP model folder {path} does not exist", path=model))
        try:
            self.processor = BlipProcessor.from_pretrained(source)
            self.model = BlipForConditionalGeneration.from_pretrained(source, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(msg("cannot load the BLIP model {model}: {error}", model=model, error=e)) from e
        self.model.to(device).eval()

    def caption(self, images: list[Image.Image], *, num_beams: int = 3, min_length: int = 5, max_length: int = 75,
                prompt: str | None = None, batch_size: int = 4, progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> list[str]:
        if num_beams < 1:
            raise UserError(msg("BLIP num_beams must be at least 1, not {value}", value=num_beams))
        if not 0 <= min_length <= max_length:
            raise UserError(msg("BLIP min_length ({min_length}) must be between 0 and max_length ({max_length})",
                                min_length=min_length, max_length=max_length))
        if batch_size < 1:
            raise UserError(msg("BLIP batch size must be at least 1, not {value}", value=batch_size))
        if self.model is None:
            raise RuntimeError("the BLIP model was unloaded")
        tokenizer = self.processor.tokenizer
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
        if max_length <= 1 + len(prompt_ids):
            # generate() would still add a token past max_length
            raise UserError(msg("BLIP max_length ({max_length}) leaves no room for a caption after the start token and the prompt's "
                                "{count} tokens", max_length=max_length, count=len(prompt_ids)) if prompt_ids else
                            msg("BLIP max_length ({max_length}) leaves no room for a caption after the start token", max_length=max_length))
        # the prompt as it decodes (lower-cased, spaces normalised), which is how the model echoes it
        echo = tokenizer.decode(prompt_ids).strip()
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            if start and cancel is not None and cancel():
                raise Cancelled(msg("BLIP captioning cancelled after {done} of {total} images", done=start, total=len(images)))
            batch = [_rgb(image) for image in images[start:start + batch_size]]
            inputs = self.processor(images=batch, text=[prompt] * len(batch) if prompt else None, return_tensors="pt")
            text = {k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask") if k in inputs}
            with torch.no_grad():
                out = self.model.generate(pixel_values=inputs["pixel_values"].to(self.device, self.dtype), **text,
                                          num_beams=num_beams, min_length=min_length, max_length=max_length)
            for decoded in self.processor.batch_decode(out, skip_special_tokens=True):
                decoded = decoded.strip()
                echoed = echo and (decoded == echo or decoded.startswith(echo + " "))
                captions.append(decoded[len(echo):].strip() if echoed else decoded)
            if progress is not None:
                progress(len(captions), len(images))
        return captions

    def unload(self) -> None:
        self.model = self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _check_folder(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise UserError(msg("BLIP model folder {path}: no config.json (save it with save_pretrained)", path=path))
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(msg("BLIP model folder {path}: config.json is unreadable: {error}", path=path, error=e)) from e
    if model_type != "blip":
        raise UserError(msg("BLIP model folder {path}: config.json describes a {model_type} model, not 'blip'", path=path,
                            model_type=repr(model_type)))
