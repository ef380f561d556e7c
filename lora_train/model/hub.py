"""Hugging Face ids for `pretrained_model_name_or_path` and `vae`, as sd-scripts takes them.

`owner/name` names a repository and `owner/name/path/file.safetensors` one file in it. The file comes
through huggingface_hub, so its progress bar, its cache (HF_HOME) and HF_HUB_OFFLINE apply. A
repository is read as one single-file checkpoint at its root; a diffusers folder is not read yet.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_train.errors import UserError, msg

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """Not a file here, and shaped like `owner/name` or `owner/name/file.ext`."""
    if Path(spec).expanduser().exists() or not _ID.match(spec) or ".." in spec:
        return False
    parts = spec.split("/")
    if len(parts) == 2:  # `models/x.safetensors` is a missing local file, not a repository
        return not spec.lower().endswith(CHECKPOINT_SUFFIXES)
    return spec.lower().endswith(CHECKPOINT_SUFFIXES)


def fetch(spec: str, key: str) -> Path:
    """The local path of the file `spec` names, downloaded into the Hugging Face cache if needed."""
    import huggingface_hub
    from huggingface_hub import errors

    owner, name, *rest = spec.split("/")
    repo = f"{owner}/{name}"
    where = _where(spec, repo, key)
    try:
        filename = "/".join(rest) if rest else _pick(repo, _repo_files(repo), spec, key)
        path = Path(huggingface_hub.hf_hub_download(repo, filename))
        if key == "pretrained_model_name_or_path":
            _fetch_yaml_beside(repo, filename)
        return path
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as e:
        raise UserError(msg("{key} '{spec}': not in the Hugging Face cache and downloading is off or failed ({error}); {where}",
                            key=key, spec=spec, error=type(e).__name__, where=where)) from e
    except (errors.RepositoryNotFoundError, errors.EntryNotFoundError, errors.RevisionNotFoundError) as e:
        raise UserError(msg("{key} '{spec}': no such file or repository on Hugging Face, and no such file here; {where}",
                            key=key, spec=spec, where=where)) from e
    except errors.HfHubHTTPError as e:
        raise UserError(msg("{key} '{spec}': the download failed ({error}); {where}", key=key, spec=spec, error=e, where=where)) from e


def _where(spec: str, repo: str, key: str) -> str:
    from huggingface_hub import constants

    return msg("download the file from https://huggingface.co/{repo} and set {key} to its path, or run once online "
               "to fill the cache ({cache})", repo=repo, key=key, cache=constants.HF_HUB_CACHE)


def _repo_files(repo: str) -> list[str]:
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return huggingface_hub.list_repo_files(repo)
    except (errors.OfflineModeIsEnabled, OSError):
        # offline: the files of the cached snapshot, if the repository was fetched before
        folder = Path(huggingface_hub.snapshot_download(repo, local_files_only=True))
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _pick(repo: str, files: list[str], spec: str, key: str) -> str:
    """The one checkpoint at the repository's root (a .safetensors over its .ckpt / .bin twin)."""
    root = [f for f in files if "/" not in f and f.lower().endswith(CHECKPOINT_SUFFIXES)]
    by_stem: dict[str, str] = {}
    for f in sorted(root, key=lambda f: not f.lower().endswith(".safetensors")):
        by_stem.setdefault(f.rsplit(".", 1)[0], f)
    found = sorted(by_stem.values())
    if len(found) == 1:
        return found[0]
    if not found and "model_index.json" in files:
        raise diffusers_refused(key, spec)
    if not found:
        raise UserError(msg("{key} '{spec}': the repository has no .safetensors or .ckpt file at its root; name the file as "
                            "{repo}/path/file.safetensors", key=key, spec=spec, repo=repo))
    raise UserError(msg("{key} '{spec}': the repository holds several checkpoints ({files}); name one as {repo}/FILE",
                        key=key, spec=spec, files=", ".join(found), repo=repo))


def _fetch_yaml_beside(repo: str, filename: str) -> None:
    """The WebUI's layout: a same-named .yaml beside the checkpoint says what model it is."""
    import huggingface_hub

    yaml = filename.rsplit(".", 1)[0] + ".yaml"
    try:
        huggingface_hub.hf_hub_download(repo, yaml)
    except Exception:  # most checkpoints have none: the stock config is chosen from the keys
        pass


def diffusers_refused(key: str, spec: str) -> UserError:
    return UserError(msg("{key} '{spec}' is a diffusers model (model_index.json, unet/, vae/ ...), which LoRA Train does not "
                         "read yet: name a single-file checkpoint, e.g. owner/name/file.safetensors", key=key, spec=spec))
