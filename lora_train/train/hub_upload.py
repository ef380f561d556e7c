"""sd-scripts' `huggingface_repo_id` & co.: each saved LoRA (and, with save_state_to_huggingface, its
state folder) is uploaded to a Hugging Face repository after it is written; `resume_from_huggingface`
downloads a state folder to resume from.

The local file is written first and is never touched: an upload that fails (no token, offline, no
such repo) costs one line and the run goes on, as in sd-scripts.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional

from lora_train.errors import UserError, msg


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise UserError(msg("huggingface_repo_id / resume_from_huggingface need the huggingface_hub package: pip install huggingface_hub")) from e
    return huggingface_hub


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class HubUpload:
    """Uploads what `Trainer.save` wrote. `notify` gets one line per failed upload."""

    def __init__(self, saving, notify: Callable[[str], None]):
        self.repo_id = saving.huggingface_repo_id
        self.repo_type = saving.huggingface_repo_type
        self.prefix = saving.huggingface_path_in_repo
        self.token = saving.huggingface_token
        # sd-scripts: private unless "public" is asked for
        self.private = saving.huggingface_repo_visibility != "public"
        self.with_state = saving.save_state_to_huggingface
        self.asynchronous = saving.async_upload
        self.notify = notify
        self.api = _hub().HfApi(token=self.token)
        self._repo_ready = False
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(cls, saving, notify: Callable[[str], None]) -> Optional["HubUpload"]:
        return cls(saving, notify) if saving.huggingface_repo_id else None

    def path_in_repo(self, name: str) -> str:
        """sd-scripts uploads to `<huggingface_path_in_repo>/<file name>`; with no path, the repository's root."""
        return f"{self.prefix.strip('/')}/{name}" if self.prefix and self.prefix.strip("/") else name

    def saved(self, lora: Path, state: Optional[Path], final: bool = False) -> None:
        """Upload `lora` (and `state` when asked to). The final save waits for its upload, as sd-scripts'
        last save does; the others run in a thread with async_upload."""
        items = [lora] + ([state] if state is not None and self.with_state else [])
        if self.asynchronous and not final:
            thread = threading.Thread(target=self._upload, args=(items,), name="hf-upload")
            thread.start()
            self._threads.append(thread)
        else:
            self._upload(items)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def _upload(self, items: list[Path]) -> None:
        with self._lock:  # one commit at a time: the hub refuses concurrent commits to a branch
            for item in items:
                try:
                    self._ensure_repo()
                    if item.is_dir():
                        self.api.upload_folder(repo_id=self.repo_id, repo_type=self.repo_type, folder_path=str(item),
                                               path_in_repo=self.path_in_repo(item.name))
                    else:
                        self.api.upload_file(repo_id=self.repo_id, repo_type=self.repo_type, path_or_fileobj=str(item),
                                             path_in_repo=self.path_in_repo(item.name))
                except Exception as e:  # offline, no token, no rights: the local file is what counts
                    self.notify(msg("Hugging Face upload of {file} to {repo} failed ({error}); the file stays in {folder}",
                                    file=item.name, repo=self.repo_id, error=_first_line(e), folder=item.parent))
                    return

    def _ensure_repo(self) -> None:
        if not self._repo_ready:
            self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private, exist_ok=True)
            self._repo_ready = True


def resume_folder(saving) -> str:
    """The local state folder to resume from: `resume` itself, or with resume_from_huggingface the
    folder downloaded from `owner/repo/path/in/repo[:revision[:repo_type]]` (sd-scripts' format)."""
    if not saving.resume_from_huggingface:
        return saving.resume
    spec = saving.resume
    parts = spec.split("/")
    if len(parts) < 3 or not all(parts[:2]):
        raise UserError(msg("resume '{value}': with resume_from_huggingface it is owner/repo/path/in/repo[:revision[:repo_type]]",
                            value=spec))
    repo_id = "/".join(parts[:2])
    path, revision, repo_type = "/".join(parts[2:]), None, None
    if ":" in path:
        pieces = path.split(":")
        path, revision = pieces[0], pieces[1] or None
        repo_type = pieces[2] if len(pieces) > 2 else "model"
    path = path.strip("/")
    hub = _hub()
    try:
        root = hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=saving.huggingface_token,
                                     allow_patterns=[f"{path}/*"])
    except Exception as e:
        raise UserError(msg("resume: downloading {path} from Hugging Face repository {repo} failed ({error})",
                            path=path, repo=repo_id, error=_first_line(e))) from e
    folder = Path(root) / path
    if not folder.is_dir() or not any(folder.iterdir()):
        raise UserError(msg("resume: the Hugging Face repository {repo} has no files under {path}", repo=repo_id, path=path))
    return str(folder)
