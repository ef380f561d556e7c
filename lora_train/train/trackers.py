"""The trackers a config asks for, picked as sd-scripts picks them (prepare_accelerator, init_trackers).

- `log_with` unset: TensorBoard when `logging_dir` is set, else none; `tensorboard`, `wandb` or `all`.
- TensorBoard writes to `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/<log_tracker_name>`, the folder
  accelerate's tracker gives it; wandb's project is `log_tracker_name` (sd-scripts' default:
  network_train), its run `wandb_run_name`, its files go to that same dated folder.
- `log_tracker_config`: a TOML file whose tables are each tracker's init arguments ([wandb] for
  wandb.init, [tensorboard] for the SummaryWriter); as in sd-scripts it replaces wandb_run_name.

A tracker that was asked for and cannot run is an error before training, never skipped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from lora_train.errors import UserError, msg
from lora_train.tomlfile import read_toml

DEFAULT_TRACKER_NAME = "network_train"
LOG_WITH = ("tensorboard", "wandb", "all")


def tracker_kinds(logging) -> list[str]:
    if logging.log_with is None or not str(logging.log_with).strip():
        return ["tensorboard"] if logging.logging_dir else []
    value = str(logging.log_with).strip().lower()
    if value not in LOG_WITH:
        raise UserError(msg("log_with '{value}' must be one of {choices}", value=logging.log_with, choices=", ".join(LOG_WITH)))
    kinds = ["tensorboard", "wandb"] if value == "all" else [value]
    if "tensorboard" in kinds and not logging.logging_dir:
        raise UserError(msg("log_with {value} needs logging_dir: the folder TensorBoard writes to", value=value))
    return kinds


def init_kwargs(logging) -> dict[str, dict[str, Any]]:
    if logging.log_tracker_config:
        data = read_toml(logging.log_tracker_config, "log_tracker_config")
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise UserError(msg("log_tracker_config '{path}': {key} must be a table of a tracker's arguments ([wandb] or [tensorboard])",
                                path=logging.log_tracker_config, key=bad[0]))
        return data
    return {"wandb": {"name": logging.wandb_run_name}} if logging.wandb_run_name else {}


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise UserError(msg("log_with wandb: the wandb package is not installed: pip install wandb")) from e
    return wandb


def check_trackers(logging) -> None:
    """What can be checked before the model loads: the log_with value, the wandb package, the tracker config."""
    kinds = tracker_kinds(logging)
    if "wandb" in kinds:
        _import_wandb()
    if kinds:
        init_kwargs(logging)


def build_trackers(logging, notes: list[str]) -> list:
    """The listeners of the run's trackers; a missing tensorboard package is a note when nobody asked for it by name."""
    from lora_train.train.observers import TensorBoard, Wandb

    kinds = tracker_kinds(logging)
    if not kinds:
        return []
    kwargs = init_kwargs(logging)
    name = logging.log_tracker_name or DEFAULT_TRACKER_NAME
    folder = run_folder(logging)
    out: list = []
    if "tensorboard" in kinds:
        try:
            out.append(TensorBoard(folder / name, **kwargs.get("tensorboard", {})))
        except ImportError:
            if logging.log_with:
                raise UserError(msg("log_with {value}: the tensorboard package is missing: pip install tensorboard", value=logging.log_with))
            notes.append(msg("logging_dir is set but the tensorboard package is missing: pip install tensorboard"))
    if "wandb" in kinds:
        out.append(Wandb(_wandb_run(logging, name, folder, kwargs.get("wandb", {}))))
    return out


def run_folder(logging) -> Optional[Path]:
    if not logging.logging_dir:
        return None
    return Path(logging.logging_dir) / f"{logging.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}"


def _wandb_run(logging, project: str, folder: Optional[Path], kwargs: dict):
    wandb = _import_wandb()
    try:
        if logging.wandb_api_key:
            wandb.login(key=logging.wandb_api_key)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            kwargs = {"dir": str(folder), **kwargs}
        return wandb.init(project=project, **kwargs)
    except Exception as e:  # not logged in (no TTY to ask), bad key, no network without WANDB_MODE=offline
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(msg("log_with wandb: wandb could not start a run ({error}); log in with wandb login, set wandb_api_key, "
                            "or set WANDB_MODE=offline", error=first)) from e

