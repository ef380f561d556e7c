"""From the training config to a dataset spec: a dataset TOML, or the kohya folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lora_train.dataset.images import check_interpolation
from lora_train.dataset.scan import require_training_folder
from lora_train.dataset.spec import (
    ASCENDABLE,
    BucketOptions,
    DatasetConfig,
    DatasetBlock,
    DatasetSpec,
    SubsetSpec,
    load_dataset_toml,
    parse_resolution,
    subsets_from_folders,
)
from lora_train.errors import UserError, msg

BLOCK_FROM_ARGS = [f.name for f in dataclasses.fields(BucketOptions)]


def spec_from_config(d: DatasetConfig, batch_size: int, default_resolution: int, processes: int = 1) -> tuple[DatasetSpec, list[tuple[Path, str]]]:
    """(spec, folder problems). Command-line style keys fill what a dataset TOML leaves unset.

    `batch_size` is the global batch; a TOML's per-dataset batch_size is per process, as in sd-scripts."""
    resolution = parse_resolution(d.resolution, default_resolution)
    check_interpolation(d.resize_interpolation, "config")
    if d.dataset_config:
        spec = load_dataset_toml(d.dataset_config, d.dataset_repeats)
        for block in spec.datasets:
            block.resolution = block.resolution or resolution
            block.batch_size = block.batch_size * processes if block.batch_size else batch_size
            _validation_from_config(block, d)
        if d.in_json:
            return spec, [(Path(d.in_json), msg("in_json is not read with dataset_config (as in sd-scripts): set metadata_file in its subsets"))]
        return spec, []
    template = SubsetSpec(**{k: getattr(d, k) for k in ASCENDABLE})
    if d.in_json:
        return _fine_tuning_spec(d, template, resolution, batch_size)
    if not d.train_data_dir:
        raise UserError(msg("train_data_dir is not set: point it at a folder holding '<repeats>_<name>' subfolders"))
    subsets, problems = subsets_from_folders(d.train_data_dir, False, template)
    if not subsets:
        details = "".join("\n  " + msg("{path}: {reason}", path=p, reason=r) for p, r in problems)
        raise UserError(msg("no training images found in '{path}'.{hint}", path=d.train_data_dir, hint=require_training_folder(Path(d.train_data_dir)))
                        + details)
    if d.reg_data_dir:
        reg, reg_problems = subsets_from_folders(d.reg_data_dir, True, template)
        subsets += reg
        problems += reg_problems
    block = DatasetBlock(resolution=resolution, batch_size=batch_size, subsets=subsets, **{k: getattr(d, k) for k in BLOCK_FROM_ARGS})
    _validation_from_config(block, d)
    return DatasetSpec([block]), problems


def _validation_from_config(block: DatasetBlock, d: DatasetConfig) -> None:
    """sd-scripts: a dataset's own validation_split / validation_seed, else the command line's."""
    if block.validation_split is None:
        block.validation_split = d.validation_split
    if block.validation_seed is None:
        block.validation_seed = d.validation_seed


def _fine_tuning_spec(d: DatasetConfig, template: SubsetSpec, resolution: tuple[int, int], batch_size: int) -> tuple[DatasetSpec, list[tuple[Path, str]]]:
    """sd-scripts with in_json: one subset, the images in train_data_dir itself (its subfolders are not
    repeats folders), the captions from the JSON, dataset_repeats as its repeats; reg_data_dir unused."""
    if d.dataset_repeats < 1:
        raise UserError(msg("dataset_repeats must be at least 1, got {value}", value=d.dataset_repeats))
    if d.train_data_dir and not Path(d.train_data_dir).is_dir():
        raise UserError(msg("{what} '{path}' does not exist", what="train_data_dir", path=d.train_data_dir))
    problems = []
    if d.reg_data_dir:
        problems.append((Path(d.reg_data_dir), msg("reg_data_dir is not used with in_json (as in sd-scripts)")))
    subset = dataclasses.replace(template, image_dir=d.train_data_dir or "", metadata_file=d.in_json, num_repeats=d.dataset_repeats)
    block = DatasetBlock(resolution=resolution, batch_size=batch_size, subsets=[subset], **{k: getattr(d, k) for k in BLOCK_FROM_ARGS})
    _validation_from_config(block, d)
    return DatasetSpec([block]), problems
