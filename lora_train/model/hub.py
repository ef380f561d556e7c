"""Hugging Face ids for `pretrained_model_name_or_path` and `vae`, as sd-scripts takes them.

`owner/name` names a repository and `owner/name/path/file.safetensors` one file in it. The file comes
through huggingface_hub, so its progress bar, its cache (HF_HOME) and HF_HUB_OFFLINE apply. A
repository is read as the one single-file checkpoint at its root or, when it has none, as a diffusers
model: the files its parts need are fetched, and the snapshot folder is loaded (diffusers_folder.py).
"""

from __future__ import annotations

import json
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
        files = [] if rest else _repo_files(repo)
        if not rest and not _root_checkpoints(files) and "model_index.json" in files:
            return _fetch_diffusers(repo, files, key)
        filename = "/".join(rest) if rest else _pick(repo, files, spec, key)
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


def _root_checkpoints(files: list[str]) -> list[str]:
    """The checkpoints at the repository's root (a .safetensors over its .ckpt / .bin twin)."""
    root = [f for f in files if "/" not in f and f.lower().endswith(CHECKPOINT_SUFFIXES)]
    by_stem: dict[str, str] = {}
    for f in sorted(root, key=lambda f: not f.lower().endswith(".safetensors")):
        by_stem.setdefault(f.rsplit(".", 1)[0], f)
    return sorted(by_stem.values())


def _pick(repo: str, files: list[str], spec: str, key: str) -> str:
    """The one checkpoint at the repository's root."""
    found = _root_checkpoints(files)
    if len(found) == 1:
        return found[0]
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


def _fetch_diffusers(repo: str, files: list[str], key: str) -> Path:
    """A diffusers repository: its configs and one weights file per part (not the fp16 twins, the
    .bin copies or the tokenizers, which LoRA Train does not read); the snapshot folder they are in.
    For `vae`, its VAE's weights file alone (a diffusers VAE is told apart by its names)."""
    import huggingface_hub

    from lora_train.model.diffusers_folder import weight_files

    parts = ("vae",) if key == "vae" else ("unet", "vae", "text_encoder", "text_encoder_2")
    wanted = [] if key == "vae" else ["model_index.json", "scheduler/scheduler_config.json"]
    for part in parts:
        if not any(f.startswith(part + "/") for f in files):
            continue  # a missing part is named when the folder is read
        weights = next((name for name in weight_files(part) if name in files or name + ".index.json" in files), None)
        configs = [] if key == "vae" else [f"{part}/config.json"]
        wanted += [*configs, *_with_shards(repo, weights, files)] if weights else configs
    if key == "vae" and not wanted:
        raise UserError(msg("{key} '{spec}': the diffusers model has no vae/ weights ({file}); name a VAE file as "
                            "{repo}/path/file.safetensors", key=key, spec=repo, file=weight_files("vae")[0], repo=repo))
    paths = [Path(huggingface_hub.hf_hub_download(repo, name)) for name in wanted if name in files]
    return paths[-1] if key == "vae" else paths[0].parent


def _with_shards(repo: str, weights: str, files: list[str]) -> list[str]:
    """`weights`, or when it is split, its index and the pieces the index names."""
    if weights in files:
        return [weights]
    import huggingface_hub

    index = weights + ".index.json"
    pieces = json.loads(Path(huggingface_hub.hf_hub_download(repo, index)).read_text(encoding="utf-8")).get("weight_map", {})
    return [index, *sorted({f"{weights.rsplit('/', 1)[0]}/{p}" for p in pieces.values()})]
