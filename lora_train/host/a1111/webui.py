"""What the WebUI has now: its settings, the loaded checkpoint and its family, and our names in it."""

from __future__ import annotations

from pathlib import Path

TASK_PREFIX = "lora-train-"
SETTING_XYZ_LORA = "lora_train_xyz_lora"
SETTING_ALLOWED_DIRS = "lora_train_allowed_dirs"  # Dataset tab roots beyond the data dir and its train folder
SETTING_PREVIEW_STEPS = "lora_train_preview_steps"  # sampling steps of previews whose line has no --s
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")

_model_version = 0  # how many checkpoints the WebUI has loaded; the tab follows each


def on_model_loaded(sd_model) -> None:
    """The WebUI's model-loaded callback: at start (after the UI is built) and on every switch."""
    global _model_version
    _model_version += 1


def model_version() -> int:
    return _model_version


def task_id(run_id: str) -> str:
    """The id the WebUI's progress API knows a run by (what `progress.create_task_id` would make)."""
    return f"task({TASK_PREFIX}{run_id})"


def opt(name: str, default=None):
    try:
        from modules import shared

        value = getattr(shared.opts, name)
    except Exception:
        return default
    return default if value is None else value


def loaded_model():
    """The loaded checkpoint or None. `shared.sd_model` would start loading one when none is."""
    from modules import sd_models

    return sd_models.model_data.sd_model


def family(model) -> str:
    if getattr(model, "is_sd3", False):
        return "sd3"
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    return "sd1"


def lora_dir() -> Path:
    """The WebUI's LoRA folder (--lora-dir, else models/Lora)."""
    from modules import shared

    folder = getattr(shared.cmd_opts, "lora_dir", None)
    if not folder:  # the built-in Lora extension (which adds --lora-dir) is disabled
        from modules import paths

        folder = Path(paths.models_path) / "Lora"
    return Path(folder)
