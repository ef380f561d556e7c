"""The WebUI as a Host: what the tab shows of its model and folders, and one run's hooks into it."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Optional

from lora_train.errors import msg
from lora_train.host.a1111.previews import sample_fn
from lora_train.host.a1111.refusals import preflight
from lora_train.host.a1111.selftest import self_test
from lora_train.host.a1111.session import report_progress, session
from lora_train.host.a1111.webui import SETTING_ALLOWED_DIRS, family, loaded_model, lora_dir, model_version, opt
from lora_train.host.a1111.xyz import remember_published, render_grid
from lora_train.host.base import Host


class A1111Host(Host):
    name = "a1111"

    def __init__(self):
        self.owner_thread: Optional[int] = None  # thread id holding queue_lock for a run
        self.task: Optional[str] = None  # the run's task id while it holds the WebUI
        self.run_name = ""
        self.total_steps = 0

    # -- what the tab shows ---------------------------------------------------------------------
    def model_label(self) -> str:
        try:
            model = loaded_model()
        except Exception:
            return msg("(WebUI model unavailable)")
        if model is None:  # the WebUI loads its checkpoint in the background after building the UI
            chosen = str(opt("sd_model_checkpoint", "") or "")
            return msg("{checkpoint} (not loaded yet)", checkpoint=chosen) if chosen else msg("no checkpoint loaded")
        info = getattr(model, "sd_checkpoint_info", None)
        return getattr(info, "title", None) or getattr(info, "name", None) or str(opt("sd_model_checkpoint", "") or msg("(unnamed checkpoint)"))

    def model_version(self) -> int:
        return model_version()

    def model_resolution(self) -> int:
        try:
            model = loaded_model()
        except Exception:
            return 512
        if model is None:
            return 512
        kind = family(model)
        if kind in ("sdxl", "sd3"):
            return 1024
        if kind == "sd2" and getattr(model, "parameterization", "eps") == "v":
            return 768
        # test and toy checkpoints built for a small size (image_size is in latent pixels; SD1's
        # yaml says 32 = 256 px although it is a 512 px model, hence the threshold)
        unet = getattr(getattr(model, "model", None), "diffusion_model", None)
        size = getattr(unet, "image_size", None)
        if isinstance(size, int) and 0 < size * 8 < 256:
            return size * 8
        return 512

    def model_family(self) -> str | None:
        try:
            model = loaded_model()
        except Exception:
            return None
        return None if model is None else family(model)

    def lora_dir(self) -> Path:
        return lora_dir()

    def work_dir(self) -> Path:
        from modules import paths

        return Path(paths.data_path) / "lora_train" / "runs"

    def access(self):
        from modules import paths, shared

        from lora_train.access import AccessPolicy

        cmd = shared.cmd_opts
        extra = [d.strip() for d in str(opt(SETTING_ALLOWED_DIRS, "") or "").replace("\n", ",").split(",")]
        # webui_is_non_local: --listen, --share, --ngrok or --server-name (the WebUI's own rule)
        remote = bool(getattr(cmd, "webui_is_non_local", False) or getattr(cmd, "listen", False) or getattr(cmd, "share", False)
                      or getattr(cmd, "server_name", None))
        insecure = bool(getattr(cmd, "enable_insecure_extension_access", False))
        if remote and not insecure:
            extra = []  # anyone who reaches the page can edit settings: they may not widen the roots
        return AccessPolicy.build([paths.data_path, Path(paths.data_path) / "train", *extra], remote=remote,
                                  insecure_allowed=insecure,
                                  hide_dirs=bool(getattr(cmd, "hide_ui_dir_config", False)))

    def models_dir(self) -> Path:
        from modules import paths

        return Path(paths.models_path) / "lora_train"

    # -- a run ------------------------------------------------------------------------------------
    def preflight(self, config) -> list[str]:
        return preflight(config)

    def session(self, config, run_id: str):
        return session(self, config, run_id)

    def on_event(self, e) -> None:
        report_progress(self, e)

    def sample_fn(self, config, adapter, prompts, folder):
        return sample_fn(self, config, adapter, prompts, folder)

    # -- after a save ------------------------------------------------------------------------------
    def after_publish(self, path: Path) -> list[str]:
        path = Path(path)
        remember_published(path.stem)
        try:
            with self._model_lock():
                return [self.self_test(path)]
        except Exception as e:  # never let a check break the run
            return [msg("self-test FAILED: the Lora loader of the WebUI fails on {file}: {error}", file=path.name,
                        error=f"{type(e).__name__}: {e}")]

    def self_test(self, path: Path) -> str:
        """Load a published file with the host's own LoRA loader (queue lock held); what did not match."""
        return self_test(path)

    def lora_files_changed(self) -> None:
        try:
            import networks  # the built-in Lora extension's module

            networks.list_available_networks()
        except Exception:  # a list refreshed on the next publish is fine too
            pass

    @contextlib.contextmanager
    def _model_lock(self):
        """queue_lock, unless this thread holds it already for a run (it is not re-entrant)."""
        if self.owner_thread == threading.get_ident():
            yield
            return
        from modules import call_queue

        with call_queue.queue_lock:
            yield

    # -- the model's own images ----------------------------------------------------------------------
    def txt2img(self, prompts) -> list:
        from lora_train.host.a1111.txt2img import txt2img

        return txt2img(self, prompts)

    def model_key(self) -> str:
        from lora_train.host.a1111.txt2img import model_key

        return model_key()

    # -- comparison grid -----------------------------------------------------------------------------
    def xyz_grid(self, files, weights, prompt, seed, out):
        return render_grid(self, files, weights, prompt, seed, out)
