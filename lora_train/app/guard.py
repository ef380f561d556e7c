"""One guard for every path the Train tab's page can send: the host's folder policy (`access.py`), the
same rule and message the Dataset tab uses.

A WebUI reachable from other machines without --enable-insecure-extension-access lets anyone who
reaches the page type a path, so a run may read and write only under the allowed folders. Paths
come back resolved (`..` and links followed), and the config is rewritten to them, so what was
checked is what the trainer opens.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_train.access import AccessPolicy
from lora_train.errors import UserError, msg
from lora_train.train.config import TrainConfig

# every key of the config tree that names a file or folder (sd-scripts' names)
PATH_KEYS = ("train_data_dir", "reg_data_dir", "dataset_config", "in_json", "network_weights", "resume", "output_dir", "logging_dir",
             "sample_prompts", "vae", "base_weights", "metadata_thumbnail", "log_tracker_config")


def _not_a_path(key: str, value: str) -> bool:
    """A thumbnail given inline, or a VAE named by its Hugging Face id: nothing on this machine is read."""
    from lora_train.model.hub import is_hub_id

    return (key == "metadata_thumbnail" and value.startswith("data:")) or (key == "vae" and is_hub_id(value))


def guarded_path(access: AccessPolicy, text: str | os.PathLike, what: str) -> Path:
    """The real path `text` names, if the policy allows it; existence is checked where it is used."""
    try:
        real, _ = access.path(text)
    except UserError as e:
        raise UserError(msg("{what}: {reason}", what=what, reason=e)) from None
    return real


def guard_config(config: TrainConfig, access: AccessPolicy) -> None:
    """Check every path of `config` against `access` and rewrite it to the resolved path; UserError
    for the first one refused. A dataset TOML's subset folders are checked too: the file is read here."""
    for key in PATH_KEYS:
        value = config.get(key)
        if isinstance(value, list):  # base_weights: several files
            config.set(key, [str(guarded_path(access, v, key)) for v in value if str(v).strip()])
        elif value is not None and str(value).strip() and not _not_a_path(key, str(value)):
            config.set(key, str(guarded_path(access, value, key)))
    if config.dataset.dataset_config and access.roots_only:
        from lora_train.dataset.spec import load_dataset_toml

        spec = load_dataset_toml(config.dataset.dataset_config)
        for subset in spec.subsets:
            if subset.image_dir:  # relative to the working folder, as the trainer opens it
                guarded_path(access, os.path.abspath(subset.image_dir), f"{Path(config.dataset.dataset_config).name}: image_dir")
            if subset.metadata_file:
                guarded_path(access, os.path.abspath(subset.metadata_file), f"{Path(config.dataset.dataset_config).name}: metadata_file")


def load_config(access: AccessPolicy, text: str) -> TrainConfig:
    """The tab's Config file > Load: a TOML, or a kohya_ss JSON. Where a stranger may type the path,
    only those suffixes: the form would show what another file's lines hold. The tab writes no file
    on Load, so a kohya_ss config's prompt text is not written out as kohya_ss does at its start."""
    path = guarded_path(access, text, msg("config file"))
    if access.roots_only and path.suffix.lower() not in (".toml", ".json"):
        raise UserError(msg("config file: {path}: a config is a .toml file (or a kohya_ss .json)", path=text))
    return TrainConfig.from_file(path, write_prompts=False)


def save_config(access: AccessPolicy, config: TrainConfig, text: str) -> Path:
    """The tab's Config file > Save. It writes only `.toml` files and overwrites only LoRA Train
    configs: the allowed folders include the WebUI's own, where a config saved over `webui-user.sh`
    or an extension's code would be run at the next start (typed by a stranger on a listening
    WebUI, or by a slip of the user's own hand)."""
    path = guarded_path(access, text, msg("config file"))
    if path.suffix.lower() != ".toml":
        raise UserError(msg("config file: {path}: a config is saved as a .toml file", path=text))
    if path.exists() and not _is_a_config(path):
        raise UserError(msg("config file: {path}: the file exists and is not a LoRA Train config, so it is not overwritten", path=text))
    return config.save_toml(path)


def _is_a_config(path: Path) -> bool:
    try:
        TrainConfig.from_toml(path)
    except (UserError, OSError, ValueError):
        return False
    return True
