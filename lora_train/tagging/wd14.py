"""WD14 (SmilingWolf) taggers through onnxruntime, preprocessed and thresholded as kohya's
`finetune/tag_images_by_wd14_tagger.py` does.

A model is a folder holding `model.onnx` and `selected_tags.csv` (`tag_id,name,category,count`;
category 9 = rating, 0 = general, 4 = character). Known models are downloaded once into the
models folder with huggingface_hub; any such folder works offline.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from lora_train.errors import UserError, close_match_hint, msg

FILES = ("model.onnx", "selected_tags.csv")


@dataclass(frozen=True)
class TaggerModel:
    name: str
    repo_id: str
    general_threshold: float  # the model card's precision = recall point
    character_threshold: float = 0.85


MODELS = {m.name: m for m in (
    TaggerModel("wd-v1-4-moat-tagger-v2", "SmilingWolf/wd-v1-4-moat-tagger-v2", 0.3771),
    TaggerModel("wd-v1-4-swinv2-tagger-v2", "SmilingWolf/wd-v1-4-swinv2-tagger-v2", 0.3771),
    TaggerModel("wd-v1-4-convnextv2-tagger-v2", "SmilingWolf/wd-v1-4-convnextv2-tagger-v2", 0.371),
    TaggerModel("wd-v1-4-convnext-tagger-v2", "SmilingWolf/wd-v1-4-convnext-tagger-v2", 0.3685),
    TaggerModel("wd-v1-4-vit-tagger-v2", "SmilingWolf/wd-v1-4-vit-tagger-v2", 0.3537),
    TaggerModel("wd-v1-4-convnext-tagger", "SmilingWolf/wd-v1-4-convnext-tagger", 0.35),
    TaggerModel("wd-v1-4-vit-tagger", "SmilingWolf/wd-v1-4-vit-tagger", 0.35),
    TaggerModel("wd-vit-tagger-v3", "SmilingWolf/wd-vit-tagger-v3", 0.2614),
    TaggerModel("wd-convnext-tagger-v3", "SmilingWolf/wd-convnext-tagger-v3", 0.2682),
    TaggerModel("wd-swinv2-tagger-v3", "SmilingWolf/wd-swinv2-tagger-v3", 0.2653),
    TaggerModel("wd-vit-large-tagger-v3", "SmilingWolf/wd-vit-large-tagger-v3", 0.2606),
    TaggerModel("wd-eva02-large-tagger-v3", "SmilingWolf/wd-eva02-large-tagger-v3", 0.5296),
)}
DEFAULT_GENERAL, DEFAULT_CHARACTER = 0.35, 0.85  # a local folder of unknown origin

# SmilingWolf's list: tags whose underscores are part of the face, not word separators
KAOMOJI = frozenset("0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split())
RATING, GENERAL, CHARACTER = 9, 0, 4


class Cancelled(Exception):
    """cancel() returned true between two batches; nothing of the unfinished batch is returned."""


@dataclass(frozen=True)
class TagOptions:
    general_threshold: float | None = None  # None: the model's own
    character_threshold: float | None = None
    include_rating: bool = False  # the single most likely rating, first
    undesired: tuple[str, ...] = ()  # "long_hair" and "long hair" both match
    replace_underscores: bool = True
    escape_brackets: bool = False  # "(" -> "\(" for A1111 prompts
    max_tags: int | None = None


# -- model files ----------------------------------------------------------------------------------
def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES)


def resolve_model(name_or_path: str, models_dir: Path, *, allow_download: bool = True) -> Path:
    """The folder holding the model: a local folder as is, or a known name under `models_dir/<name>/`,
    downloaded there first when missing and allowed."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        if not _complete(path):
            missing = [f for f in FILES if not (path / f).is_file()]
            raise UserError(msg("{path}: a WD14 tagger folder must hold model.onnx and selected_tags.csv; missing {missing}",
                                path=path, missing=", ".join(missing)))
        return path
    name = str(name_or_path).strip()
    model = MODELS.get(name)
    if model is None:
        raise UserError(msg("tagger {name}: no such folder and not a known model{hint}; known: {known}",
                            name=repr(name), hint=close_match_hint(name, MODELS), known=", ".join(MODELS)))
    folder = Path(models_dir) / name
    if _complete(folder):
        return folder
    if not allow_download:
        raise UserError(msg("tagger {name} is not in {folder} and downloading is refused here; put model.onnx and selected_tags.csv there",
                            name=name, folder=folder))
    from huggingface_hub import hf_hub_download

    try:
        for f in FILES:
            hf_hub_download(model.repo_id, f, local_dir=str(folder))
    except Exception as e:  # offline, no such repo, disk full: all end the same way for the user
        raise UserError(msg("could not download {repo} into {folder}: {error}", repo=model.repo_id, folder=folder,
                            error=f"{type(e).__name__}: {e}")) from None
    if not _complete(folder):
        raise UserError(msg("downloading {repo} left {folder} without model.onnx and selected_tags.csv", repo=model.repo_id, folder=folder))
    return folder


def read_tags(path: Path) -> tuple[list[str], np.ndarray]:
    """Tag names and categories from selected_tags.csv, in model output order."""
    names, categories = [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:3]] != ["tag_id", "name", "category"]:
                raise UserError(msg("{path}: line 1 must be the header tag_id,name,category,count, not {header}", path=path, header=repr(header)))
            for line, row in enumerate(rows, start=2):
                try:
                    names.append(row[1])
                    categories.append(int(row[2]))
                except (IndexError, ValueError):
                    raise UserError(msg("{path}, line {line}: expected tag_id,name,category,count, got {row}", path=path, line=line,
                                        row=repr(row))) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(msg("{path}: cannot read ({error})", path=path, error=e)) from None
    return names, np.array(categories)


# -- preprocessing ---------------------------------------------------------------------------------
def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """kohya's preprocessing: alpha onto white, pad to a centred white square, resize to `size`,
    RGB -> BGR, float32 0-255, (size, size, 3). Downscaling averages areas (PIL BOX = OpenCV
    INTER_AREA), upscaling is bicubic."""
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.split()[3])
    elif image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    side = max(w, h)
    if (w, h) != (side, side):
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    if side != size:
        image = image.resize((size, size), Image.BOX if side > size else Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(image, dtype=np.float32)[:, :, ::-1])


# -- the tagger ------------------------------------------------------------------------------------
def gpu_provider_warning(available_providers: Sequence[str], cuda_available: bool) -> str | None:
    if cuda_available and "CUDAExecutionProvider" not in available_providers:
        return msg("onnxruntime has no CUDA provider on this GPU machine, so tagging runs on the CPU (slow). Usually "
                   "both onnxruntime and onnxruntime-gpu are installed, or onnxruntime-gpu does not match the CUDA "
                   "version: `pip uninstall -y onnxruntime onnxruntime-gpu`, then install the onnxruntime-gpu "
                   "build for your CUDA (see onnxruntime.ai).")
    return None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


class WD14Tagger:
    def __init__(self, folder: Path, providers: list[str] | None = None, batch_size: int = 4):
        import onnxruntime as ort

        folder = Path(folder)
        self.model = MODELS.get(folder.name)  # a downloaded model's folder is named after it
        self.names, self.categories = read_tags(folder / "selected_tags.csv")
        available = ort.get_available_providers()
        self.warning = gpu_provider_warning(available, _cuda_available())
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise UserError(msg("{path}: onnxruntime cannot load it ({error})", path=folder / "model.onnx", error=e)) from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] or shape[3] != 3:
            raise UserError(msg("{path}: input shape {shape} is not [batch, size, size, 3] (NHWC)", path=folder / "model.onnx", shape=shape))
        self.size = shape[1]
        # a model exported with a fixed batch of 1 is run one image at a time
        self.batch_size = batch_size if not isinstance(shape[0], int) else shape[0]
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.names):
            raise UserError(msg("{folder}: model.onnx gives {outputs} scores but selected_tags.csv lists {count} tags", folder=folder,
                                outputs=outputs, count=len(self.names)))

    def predict(self, images: Sequence[Image.Image], progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            if cancel is not None and cancel():
                raise Cancelled(msg("cancelled after {done} of {total} images", done=start, total=len(images)))
            batch = np.stack([preprocess(im, self.size) for im in images[start:start + self.batch_size]])
            out.append(self.session.run(None, {self.input_name: batch})[0])
            if progress is not None:
                progress(min(start + self.batch_size, len(images)), len(images))
        return np.concatenate(out) if out else np.zeros((0, len(self.names)), np.float32)

    def thresholds(self, options: TagOptions) -> tuple[float, float]:
        model = self.model
        general = options.general_threshold if options.general_threshold is not None else (
            model.general_threshold if model else DEFAULT_GENERAL)
        character = options.character_threshold if options.character_threshold is not None else (
            model.character_threshold if model else DEFAULT_CHARACTER)
        return general, character

    def tag(self, images: Sequence[Image.Image], options: TagOptions = TagOptions(), progress=None,
            cancel=None) -> list[list[tuple[str, float]]]:
        probs = self.predict(images, progress, cancel)
        general, character = self.thresholds(options)
        return [select_tags(p, self.names, self.categories, options, general, character) for p in probs]


def format_tag(name: str, options: TagOptions) -> str:
    if options.replace_underscores and name not in KAOMOJI:
        name = name.replace("_", " ")
    if options.escape_brackets:
        name = name.replace("(", "\\(").replace(")", "\\)")
    return name


def select_tags(probs: np.ndarray, names: Sequence[str], categories: np.ndarray, options: TagOptions,
                general: float, character: float) -> list[tuple[str, float]]:
    """Tags over their category's threshold (>=, as kohya): rating first (if asked), then character
    tags, then general tags, each by confidence (ties in csv order)."""
    undesired = {u.strip().replace("_", " ").casefold() for u in options.undesired if u.strip()}

    def wanted(i: int) -> bool:
        return names[i].replace("_", " ").casefold() not in undesired

    def ranked(category: int, threshold: float) -> list[int]:
        found = [i for i in np.flatnonzero(categories == category) if probs[i] >= threshold and wanted(i)]
        return sorted(found, key=lambda i: (-float(probs[i]), i))

    chosen = []
    if options.include_rating:
        ratings = [i for i in np.flatnonzero(categories == RATING) if wanted(i)]
        if ratings:
            chosen.append(max(ratings, key=lambda i: (float(probs[i]), -i)))
    chosen += ranked(CHARACTER, character) + ranked(GENERAL, general)
    if options.max_tags is not None:
        chosen = chosen[: max(0, options.max_tags)]
    return [(format_tag(names[i], options), round(float(probs[i]), 4)) for i in chosen if math.isfinite(float(probs[i]))]
