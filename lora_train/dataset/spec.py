"""What to train on: sd-scripts' dataset config (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`).

A kohya folder (`train_data_dir/10_name/`, `reg_data_dir/...`) becomes the same structure, one subset
per `<repeats>_<name>` folder, the way sd-scripts' `generate_dreambooth_subsets_config_by_subdirs` does.
Keys a subset does not set come from its dataset, then from `[general]` ("ascendable" keys).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lora_train.dataset.images import check_interpolation
from lora_train.errors import UserError, close_match_hint, msg
from lora_train.tomlfile import read_toml, write_toml

REPEATS_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass
class SubsetOptions:
    """Keys a subset, its dataset or [general] may set: sd-scripts' "ascendable" subset keys."""

    caption_extension: Optional[str] = None
    # caption processing
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    caption_separator: str = ","
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False
    # sd-scripts' tag warm-up: the first steps train on fewer tags (see captions.warmup_tags)
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0  # steps to reach all tags; below 1, a fraction of max_train_steps
    # augmentation
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    alpha_mask: bool = False
    # images.RESIZE_FILTERS' names; None: Lanczos to shrink, bicubic to enlarge
    resize_interpolation: Optional[str] = None


@dataclass
class SubsetSpec(SubsetOptions):
    image_dir: str = ""
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: Optional[str] = None
    # sd-scripts' fine-tuning subset: captions (and bucket sizes) come from this JSON, not caption files
    metadata_file: Optional[str] = None


@dataclass
class BucketOptions:
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


@dataclass
class DatasetConfig(SubsetOptions, BucketOptions):
    """Where the images are, and (inherited) the caption and augmentation keys for all subsets.
    caption_extension None means ".txt", else ".caption" (sd-scripts' default is ".caption",
    lora-scripts' ".txt")."""

    train_data_dir: Optional[str] = None
    reg_data_dir: Optional[str] = None
    dataset_config: Optional[str] = None  # sd-scripts dataset TOML; replaces the two folders above
    # sd-scripts' fine-tuning metadata (merge_captions_to_metadata.py ...): train_data_dir then holds the
    # images themselves, and dataset_repeats is their repeats
    in_json: Optional[str] = None
    dataset_repeats: int = 1
    resolution: Optional[str] = None  # "512" or "512,768" (width,height); None = the model's own
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    # sd-scripts' held-out images: this fraction of each image folder never trains and gives the validation
    # loss; which ones: the folder shuffled with validation_seed (None: the run's seed)
    validation_split: float = 0.0
    validation_seed: Optional[int] = None
    # sd-scripts' DataLoader worker processes; here threads that make the next batches' images while a
    # step trains (not used with cached latents), at most one per CPU core; 0: in the training thread
    max_data_loader_n_workers: int = 8


@dataclass
class DatasetBlock(BucketOptions):
    resolution: Optional[tuple[int, int]] = None
    batch_size: Optional[int] = None
    validation_split: Optional[float] = None  # None: the config's
    validation_seed: Optional[int] = None
    subsets: list[SubsetSpec] = field(default_factory=list)


@dataclass
class DatasetSpec:
    datasets: list[DatasetBlock] = field(default_factory=list)

    @property
    def subsets(self) -> list[SubsetSpec]:
        return [s for d in self.datasets for s in d.subsets]


SUBSET_KEYS = {f.name for f in dataclasses.fields(SubsetSpec)}
DATASET_KEYS = {f.name for f in dataclasses.fields(DatasetBlock)} - {"subsets"}
ASCENDABLE = {f.name for f in dataclasses.fields(SubsetOptions)}


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    hints = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key == "resolution" and value is not None:
            value = _resolution(value, where)
        elif key in hints and value is not None:
            default = getattr(type(obj)(), key) if key != "subsets" else None
            expected = type(default) if default is not None else None
            if expected in (int, float) and isinstance(value, bool):
                raise UserError(msg("{where}: '{key}' must be a number, got {value}", where=where, key=key, value=repr(value)))
            if expected is float and isinstance(value, int):
                value = float(value)
            if expected is not None and not isinstance(value, expected):
                raise UserError(msg("{where}: '{key}' must be {type}, got {value}", where=where, key=key, type=expected.__name__, value=repr(value)))
        if key == "resize_interpolation":
            check_interpolation(value, where)
        setattr(obj, key, value)


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
        if all(p.isdigit() for p in parts) and len(parts) in (1, 2):
            return int(parts[0]), int(parts[-1])
    raise UserError(msg("{where}: resolution must be a number or [width, height], got {value}", where=where, value=repr(value)))


def parse_resolution(text: str | None, default: int) -> tuple[int, int]:
    """sd-scripts' `--resolution`: "512" or "width,height" (multiples of 64: the VAE's x8 and the
    UNet's three halvings)."""
    if text is None:
        return default, default
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        size = [int(p) for p in parts]
    except ValueError:
        raise UserError(msg("resolution '{text}' is not a number or 'width,height'", text=text)) from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 64 or any(s % 64 for s in size):
        raise UserError(msg("resolution '{text}' must be a multiple of 64 (e.g. 512 or 512,768)", text=text))
    return size[0], size[1]


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        if len(unknown) == 1:
            raise UserError(msg("{source}: unknown key '{key}'{hint}", source=where, key=unknown[0], hint=close_match_hint(unknown[0], allowed)))
        # one key a line, so each close-match hint is translated with its key
        raise UserError("\n".join([msg("{source}: unknown keys:", source=where)] + [f"  '{k}'{close_match_hint(k, allowed)}" for k in unknown]))


def load_dataset_toml(path: str | os.PathLike, default_repeats: int = 1) -> DatasetSpec:
    """Read an sd-scripts dataset config. Relative image_dir paths are relative to the file.
    `default_repeats`: num_repeats where the file sets none (sd-scripts falls back to --dataset_repeats)."""
    path = Path(path)
    data = read_toml(path, "dataset config")
    _check_keys(data, {"general", "datasets"}, str(path))
    general = data.get("general", {})
    _check_keys(general, ASCENDABLE | DATASET_KEYS, f"{path} [general]")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise UserError(msg("{path}: needs at least one [[datasets]] with [[datasets.subsets]]", path=path))
    spec = DatasetSpec()
    for i, d in enumerate(datasets):
        where = f"{path} [[datasets]] #{i + 1}"
        _check_keys(d, DATASET_KEYS | ASCENDABLE | {"subsets"}, where)
        block = DatasetBlock()
        _apply(block, {k: v for k, v in general.items() if k in DATASET_KEYS}, f"{path} [general]")
        _apply(block, {k: v for k, v in d.items() if k in DATASET_KEYS}, where)
        for j, s in enumerate(d.get("subsets") or []):
            swhere = f"{where} subset #{j + 1}"
            _check_keys(s, SUBSET_KEYS, swhere)
            if "image_dir" not in s and "metadata_file" not in s:
                raise UserError(msg("{where}: image_dir is required", where=swhere))
            if "metadata_file" in s and s.get("is_reg"):
                raise UserError(msg("{where}: a subset with metadata_file cannot be is_reg (sd-scripts' fine-tuning subsets have no "
                                    "regularization images)", where=swhere))
            subset = SubsetSpec(num_repeats=default_repeats)
            _apply(subset, {k: v for k, v in general.items() if k in ASCENDABLE}, f"{path} [general]")
            _apply(subset, {k: v for k, v in d.items() if k in ASCENDABLE}, where)
            _apply(subset, s, swhere)
            subset.image_dir = _relative_to(path, subset.image_dir)
            subset.metadata_file = _relative_to(path, subset.metadata_file)
            block.subsets.append(subset)
        if not block.subsets:
            raise UserError(msg("{where}: has no [[datasets.subsets]]", where=where))
        spec.datasets.append(block)
    return spec


def _relative_to(toml: Path, value: str | None) -> str | None:
    if not value:
        return value
    p = Path(value)
    return str(p if p.is_absolute() else toml.parent / p)


def dataset_toml_dict(spec: DatasetSpec) -> dict:
    """The spec as sd-scripts' dataset TOML: per-dataset and per-subset keys that differ from defaults."""
    default_block, default_subset = DatasetBlock(), SubsetSpec()
    out = []
    for block in spec.datasets:
        d = {k: list(v) if k == "resolution" else v for k in DATASET_KEYS if (v := getattr(block, k)) != getattr(default_block, k) and v is not None}
        d["subsets"] = [
            {k: v for k, v in dataclasses.asdict(s).items()
             if (k == "image_dir" and not s.metadata_file) or (v != getattr(default_subset, k) and v is not None)}
            for s in block.subsets
        ]
        out.append(d)
    return {"datasets": out}


def save_dataset_toml(spec: DatasetSpec, path: str | os.PathLike) -> Path:
    return write_toml(path, dataset_toml_dict(spec))


def subsets_from_folders(root: str | os.PathLike, is_reg: bool, template: SubsetSpec) -> tuple[list[SubsetSpec], list[tuple[Path, str]]]:
    """`<root>/<repeats>_<name>/` folders as subsets (sd-scripts' kohya convention).

    Returns (subsets, problems); folders without the prefix are reported, not silently skipped.
    """
    root = Path(root)
    what = "reg_data_dir" if is_reg else "train_data_dir"
    if not root.exists():
        raise UserError(msg("{what} '{path}' does not exist", what=what, path=root))
    if not root.is_dir():
        raise UserError(msg("{what} '{path}' is not a folder", what=what, path=root))
    subsets, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = REPEATS_DIR.match(folder.name)
        if not m:
            problems.append((folder, msg("folder name has no repeats prefix like '10_name'; its images are not used")))
            continue
        repeats = int(m.group(1))
        if repeats < 1:
            problems.append((folder, msg("repeats must be at least 1; its images are not used")))
            continue
        subsets.append(dataclasses.replace(template, image_dir=str(folder), num_repeats=repeats, is_reg=is_reg, class_tokens=m.group(2).strip() or None))
    return subsets, problems
