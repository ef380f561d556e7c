"""The AUTOMATIC1111 WebUI (v1.10) host: training runs on the checkpoint the WebUI has loaded.

This is the only module of `lora_train` that imports the WebUI's `modules.*` (and the built-in Lora
extension's `networks`), always inside functions, so importing it costs nothing and the tests can
put fakes in `sys.modules`. Only `scripts/lora_train_tab.py` imports it.

What a run does to the WebUI (see the reference notes, "Design checklist"):
- It holds `call_queue.queue_lock` from start to end, in the run's own thread: txt2img, the API and
  settings that reload weights wait for it (the lock is FIFO and not re-entrant, so nothing here
  calls anything that takes it again). It is registered as a task `task(lora-train-<run id>)` with
  `progress` and `shared.state`, so the stock progress API reports it.
- Before training it puts back the base weights the built-in Lora extension merged in place, drops
  hypernetworks, and trains on `shared.sd_model` through `LdmAdapter`; the trainer's own hooks are
  removed when it ends, so the UNet is bit-identical afterwards.
- Stop is the run manager's own event: the txt2img Interrupt button (`shared.state.interrupted`)
  is global and the WebUI sets it on every "Reload UI", so it does not stop training.
- `--medvram` keeps the UNet, text encoder and VAE on the CPU and swaps one at a time onto the GPU
  through forward hooks. A run then trains the UNet only, caches latents and (where captions are
  fixed) text-encoder outputs before the first step, and pins the UNet on the GPU: after the caches
  nothing else runs, so it stays there. Our LoRA modules hook the layers from outside, so swaps
  never move them or the optimizer state. `--lowvram` is refused: it moves each UNet block off the
  GPU right after its forward pass, which breaks the backward pass.
"""

from __future__ import annotations

import ast
import contextlib
import os
import logging
import re
import threading
import traceback
from pathlib import Path
from typing import Optional

from lora_train.errors import UserError
from lora_train.host.base import Host

log = logging.getLogger(__name__)

TASK_PREFIX = "lora-train-"
XYZ_PREFIX = "[LoRA Train]"
XYZ_WEIGHT = f"{XYZ_PREFIX} LoRA weight"
XYZ_CHECKPOINT = f"{XYZ_PREFIX} LoRA checkpoint"
SETTING_XYZ_LORA = "lora_train_xyz_lora"
SETTING_ALLOWED_DIRS = "lora_train_allowed_dirs"  # Dataset tab roots beyond the data dir and its train folder
SETTING_PREVIEW_STEPS = "lora_train_preview_steps"  # sampling steps of previews whose line has no --s
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")

# sd-scripts' sample sampler names -> the WebUI's
A1111_SAMPLERS = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2M",
}
DEFAULT_A1111_SAMPLER = "Euler a"

_last_published: Optional[str] = None  # stem of the last LoRA a run published (the XYZ axes' default)
_manager = None
_manager_lock = threading.Lock()


def task_id(run_id: str) -> str:
    """The id the WebUI's progress API knows a run by (what `progress.create_task_id` would make)."""
    return f"task({TASK_PREFIX}{run_id})"


def manager():
    """The one RunManager of this WebUI process. It outlives UI reloads (this module stays in
    `sys.modules` when the WebUI re-imports the extension's script), so a reload never starts a
    second manager beside a run that is still going."""
    global _manager
    with _manager_lock:
        if _manager is None:
            from lora_train.ui.runs import RunManager

            _manager = RunManager(A1111Host())
        return _manager


def _opt(name: str, default=None):
    try:
        from modules import shared

        value = getattr(shared.opts, name)
    except Exception:
        return default
    return default if value is None else value


def _loaded_model():
    """The loaded checkpoint or None. `shared.sd_model` would start loading one when none is."""
    from modules import sd_models

    return sd_models.model_data.sd_model


def _family(model) -> str:
    if getattr(model, "is_sd3", False):
        return "sd3"
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    return "sd1"


class A1111Host(Host):
    name = "a1111"

    def __init__(self):
        self._owner: Optional[int] = None  # thread id holding queue_lock for a run
        self._task: Optional[str] = None
        self._run_name = ""
        self._total_steps = 0

    # -- what the tab shows ---------------------------------------------------------------------
    def model_label(self) -> str:
        try:
            model = _loaded_model()
        except Exception:
            return "(WebUI model unavailable)"
        if model is None:  # the WebUI loads its checkpoint in the background after building the UI
            chosen = str(_opt("sd_model_checkpoint", "") or "")
            return f"{chosen} (not loaded yet)" if chosen else "no checkpoint loaded"
        info = getattr(model, "sd_checkpoint_info", None)
        return getattr(info, "title", None) or getattr(info, "name", None) or str(_opt("sd_model_checkpoint", "") or "(unnamed checkpoint)")

    def model_resolution(self) -> int:
        try:
            model = _loaded_model()
        except Exception:
            return 512
        if model is None:
            return 512
        family = _family(model)
        if family in ("sdxl", "sd3"):
            return 1024
        if family == "sd2" and getattr(model, "parameterization", "eps") == "v":
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
            model = _loaded_model()
        except Exception:
            return None
        return None if model is None else _family(model)

    def lora_dir(self) -> Path:
        from modules import shared

        folder = getattr(shared.cmd_opts, "lora_dir", None)
        if not folder:  # the built-in Lora extension (which adds --lora-dir) is disabled
            from modules import paths

            folder = Path(paths.models_path) / "Lora"
        return Path(folder)

    def work_dir(self) -> Path:
        from modules import paths

        return Path(paths.data_path) / "lora_train" / "runs"

    def access(self):
        from modules import paths, shared

        from lora_train.access import AccessPolicy

        cmd = shared.cmd_opts
        extra = [d.strip() for d in str(_opt(SETTING_ALLOWED_DIRS, "") or "").replace("\n", ",").split(",")]
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

    # -- refusals -------------------------------------------------------------------------------
    def preflight(self, config) -> list[str]:
        from modules import shared

        problems = []
        cmd = shared.cmd_opts
        if getattr(cmd, "lowvram", False):
            problems.append("The WebUI runs with --lowvram: it moves each UNet block off the GPU right after its "
                            "forward pass, which breaks training's backward pass. Restart the WebUI without --lowvram.")
        model = _loaded_model()
        if model is None:
            problems.append("No checkpoint is loaded: choose one in the 'Stable Diffusion checkpoint' list at the top "
                            "of the page (and wait until it has loaded), then start again.")
            return problems
        family = _family(model)
        if family == "sd3":
            problems.append("The loaded checkpoint is SD3, which LoRA Train cannot train. Load an SD1.x or SD2.x checkpoint.")
        elif family == "sdxl" and not hasattr(getattr(model, "model", None), "diffusion_model"):
            problems.append(f"The loaded SDXL model ({type(model).__name__}) has no sgm UNet LoRA Train knows.")
        fp8 = str(_opt("fp8_storage", "Disable"))
        if fp8 == "Enable" or (fp8 == "Enable for SDXL" and family == "sdxl") or _has_fp8_weights(model):
            problems.append(f"Settings > Optimizations > FP8 weight is '{fp8}': the model's weights are stored in "
                            "8-bit floats, which cannot be trained on. Set it to 'Disable' (the model reloads), then start again.")
        try:
            from modules import sd_unet

            unet = sd_unet.current_unet
        except Exception:
            unet = None
        if unet is not None:
            label = getattr(getattr(unet, "option", None), "label", type(unet).__name__)
            problems.append(f"A replacement UNet is active ({label}, Settings > Stable Diffusion > SD Unet): it "
                            "bypasses the model's own UNet, so nothing could be trained. Set SD Unet to 'None'.")
        conditioning = getattr(getattr(model, "model", None), "conditioning_key", None)
        if conditioning in ("hybrid", "concat") or getattr(model, "is_sdxl_inpaint", False):
            problems.append(f"The loaded checkpoint is an inpainting/instruct-pix2pix/depth model (conditioning "
                            f"'{conditioning}'): LoRA Train trains text-to-image models only. Load a normal checkpoint.")
        if family in ("sd1", "sd2") and not (hasattr(model, "cond_stage_model") and hasattr(model, "model")):
            problems.append(f"The loaded model ({type(model).__name__}) is not a Stable Diffusion 1.x/2.x model LoRA Train knows.")
        return problems

    # -- one run --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, config, run_id: str):
        from modules import call_queue, progress, shared

        from lora_train.model.select import adapter_for

        task = task_id(run_id)
        progress.add_task_to_queue(task)  # the progress API says "In queue" while we wait
        call_queue.queue_lock.acquire()
        self._owner = threading.get_ident()
        try:
            shared.state.begin(job=task)
            progress.start_task(task)
            self._task, self._run_name, self._total_steps = task, config.saving.output_name or "", 0
            try:
                problems = self.preflight(config)  # again: the model may have changed while we waited
                if problems:
                    raise UserError("\n".join(problems))
                model = _loaded_model()
                restore_lora_merges(model)
                shared.loaded_hypernetworks = []
                shared.state.textinfo = f"LoRA Train: preparing {self._run_name} ..."
                # ss_sd_model_name / ss_sd_model_hash come from the checkpoint file the WebUI loaded
                filename = getattr(getattr(model, "sd_checkpoint_info", None), "filename", None) or getattr(model, "sd_model_checkpoint", None)
                from modules import devices

                # the WebUI's main device, not wherever the UNet happens to be: --medvram moves it
                adapter = adapter_for(model, name=os.path.basename(filename) if filename else None,
                                      clip_skip=int(_opt("CLIP_stop_at_last_layers", 1) or 1), device=devices.device)
                adapter.info.path = filename
                if _medvram(model):
                    adapter.info.notes += medvram_config(config)
                    _pin_unet(model, devices.device)
                yield adapter
            finally:
                self._task = None
                progress.finish_task(task)
                shared.state.end()
        finally:
            self._owner = None
            call_queue.queue_lock.release()

    def on_event(self, e) -> None:
        from lora_train.train import events as ev

        if self._task is None:
            return
        try:
            from modules import shared

            state = shared.state
            name = self._run_name
            if isinstance(e, ev.Started):
                self._total_steps = e.total_steps
                state.job_count, state.job_no = e.total_steps, 0
                state.sampling_steps = state.sampling_step = 0
                state.textinfo = f"LoRA Train: {name}: {e.num_images} images, {e.epochs} epochs, {e.total_steps} steps"
            elif isinstance(e, ev.Step):
                state.job_no = e.step
                state.textinfo = f"LoRA Train: {name}: step {e.step}/{self._total_steps}, epoch {e.epoch}, loss {e.loss:.4f}"
            elif isinstance(e, ev.CheckpointSaved):
                state.textinfo = f"LoRA Train: {name}: saved {Path(e.path).name}"
            elif isinstance(e, ev.Samples) and e.paths:
                from PIL import Image

                with Image.open(e.paths[0]) as image:
                    state.assign_current_image(image.copy())
            elif isinstance(e, ev.Finished):
                state.job_no = state.job_count
                state.textinfo = f"LoRA Train: {name}: finished ({Path(e.path).name})"
            elif isinstance(e, ev.Cancelled):
                state.textinfo = f"LoRA Train: {name}: stopped at step {e.step}"
            elif isinstance(e, ev.Failed):
                state.textinfo = f"LoRA Train: {name}: failed at step {e.step}: {e.error}"
        except Exception:  # the progress display must never break a run
            log.debug("LoRA Train: progress update failed", exc_info=True)

    # -- previews ---------------------------------------------------------------------------------
    def sample_fn(self, config, adapter, prompts, folder):
        from lora_train.sample.previews import preview_prompts, sample_stem
        from lora_train.sample.render import save_png

        if not prompts:
            return None
        size = self.model_resolution()
        steps = int(_opt(SETTING_PREVIEW_STEPS, 20) or 20)
        parsed = preview_prompts(prompts, config.sampling.sample_sampler, size, steps)
        name = config.saving.output_name or "lora"
        default_seed = config.training.seed or 1
        folder = Path(folder)

        def sample(epoch: int, step: int) -> list[Path]:
            import torch
            from modules import processing, shared

            folder.mkdir(parents=True, exist_ok=True)
            paths: list[Path] = []
            cpu_rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            saved_state = _save_progress_state(shared.state)
            try:
                with _pinned_checkpoint(adapter.model), _own_cond_cache(processing):
                    for i, sp in enumerate(parsed):
                        # a stray txt2img Interrupt would cut every preview short; it means nothing to us
                        shared.state.interrupted = shared.state.skipped = False
                        p = processing.StableDiffusionProcessingTxt2Img(
                            sd_model=adapter.model, prompt=sp.prompt, negative_prompt=sp.negative, steps=sp.steps,
                            width=sp.width, height=sp.height, cfg_scale=sp.scale,
                            seed=sp.seed if sp.seed is not None else default_seed,
                            sampler_name=a1111_sampler(sp.sampler), batch_size=1, n_iter=1,
                            do_not_save_samples=True, do_not_save_grid=True, do_not_reload_embeddings=True,
                        )
                        p.disable_extra_networks = True  # the LoRA being trained is already on the model
                        with contextlib.closing(p):
                            processed = processing.process_images(p)
                        if not processed.images:
                            continue
                        info = processed.infotexts[0] if getattr(processed, "infotexts", None) else ""
                        path = folder / f"{sample_stem(name, epoch, step, i)}.png"
                        save_png(processed.images[0], path, f"{info}, LoRA Train: {name}, Epoch: {epoch}, Step: {step}".lstrip(", "))
                        paths.append(path)
            except Exception as e:  # a failed preview must not end an hour-long run
                log.error("LoRA Train: preview failed: %s\n%s", e, traceback.format_exc())
                saved_state["textinfo"] = f"LoRA Train: {name}: preview failed: {type(e).__name__}: {e}"
            finally:
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
                _restore_progress_state(shared.state, saved_state)
            return paths

        return sample

    # -- after a save ------------------------------------------------------------------------------
    def after_publish(self, path: Path) -> list[str]:
        global _last_published
        path = Path(path)
        _last_published = path.stem
        try:
            with self._model_lock():
                return [self._self_test(path)]
        except Exception as e:  # never let a check break the run
            from lora_train.network.selftest import FAILED

            return [f"{FAILED}: the WebUI's Lora loader fails on {path.name}: {type(e).__name__}: {e}"]

    def _self_test(self, path: Path) -> str:
        from lora_train.network.selftest import self_test_message

        try:
            import networks  # the built-in Lora extension's module (kept in sys.modules by the WebUI)
        except ImportError:
            return (f"self-test skipped: the WebUI's built-in Lora extension is not loaded, so {path.name} "
                    "cannot be used in prompts here")
        networks.list_available_networks()
        if _loaded_model() is None:
            return f"self-test skipped: no checkpoint is loaded to test {path.name} against"
        on_disk = networks.available_networks.get(path.stem)
        if on_disk is None:
            import network

            on_disk = network.NetworkOnDisk(path.stem, str(path))
        return self_test_message(path, unmatched_in_host(networks, path.stem, on_disk))

    @contextlib.contextmanager
    def _model_lock(self):
        """queue_lock, unless this thread holds it already for a run (it is not re-entrant)."""
        if self._owner == threading.get_ident():
            yield
            return
        from modules import call_queue

        with call_queue.queue_lock:
            yield

    # -- comparison grid -----------------------------------------------------------------------------
    def xyz_grid(self, files, weights, prompt, seed, out):
        if self._owner is not None:
            raise UserError("A training run is using the model right now: make the grid when it has finished (or stop it).")
        from modules import call_queue, images, processing, shared

        files, weights, out = [Path(f) for f in files], [float(w) for w in weights], Path(out)
        if not files or not weights:
            raise UserError("The grid needs at least one LoRA file and one weight.")
        with call_queue.queue_lock:
            shared.state.begin(job=f"{TASK_PREFIX}grid")
            try:
                if _loaded_model() is None:
                    raise UserError("No checkpoint is loaded.")
                try:
                    import networks

                    networks.list_available_networks()
                except ImportError:
                    raise UserError("The WebUI's built-in Lora extension is disabled: <lora:...> prompts do nothing.") from None
                size = self.model_resolution()
                shared.state.job_count = len(files) * len(weights)
                cells = []
                for f in files:
                    for w in weights:
                        shared.state.interrupted = shared.state.skipped = False
                        p = processing.StableDiffusionProcessingTxt2Img(
                            sd_model=shared.sd_model, prompt=f"{prompt} <lora:{f.stem}:{w:g}>".strip(), negative_prompt="",
                            steps=20, width=size, height=size, cfg_scale=7.0, seed=int(seed),
                            sampler_name=DEFAULT_A1111_SAMPLER, batch_size=1, n_iter=1,
                            do_not_save_samples=True, do_not_save_grid=True,
                        )
                        with contextlib.closing(p):
                            processed = processing.process_images(p)
                        if not processed.images:
                            raise UserError("The WebUI returned no image (interrupted?)")
                        cells.append(processed.images[0])
                w_px, h_px = cells[0].size
                grid = images.image_grid(cells, rows=len(files))
                grid = images.draw_grid_annotations(
                    grid, w_px, h_px,
                    [[images.GridAnnotation(f"weight {w:g}")] for w in weights],
                    [[images.GridAnnotation(f.stem)] for f in files],
                )
                out.parent.mkdir(parents=True, exist_ok=True)
                grid.save(out)
                return out
            finally:
                shared.state.end()


# -- helpers ---------------------------------------------------------------------------------------
def a1111_sampler(name: Optional[str]) -> str:
    """An sd-scripts sampler name (or a WebUI one) -> a sampler the WebUI has."""
    key = (name or "").strip()
    try:
        from modules import sd_samplers

        known = sd_samplers.samplers_map  # lower-case names and aliases -> name
        if key.lower() in known:
            return known[key.lower()]
    except Exception:
        known = None
    mapped = A1111_SAMPLERS.get(key.lower())
    if mapped and (known is None or mapped.lower() in known):
        return mapped
    return DEFAULT_A1111_SAMPLER


def _medvram(model) -> bool:
    from modules import shared

    cmd = shared.cmd_opts
    return not getattr(cmd, "lowvram", False) and bool(getattr(cmd, "medvram", False) or getattr(model, "lowvram", False))


def medvram_config(config) -> list[str]:
    """What a run changes under --medvram so that only the UNet runs during the steps; returns the
    notes that tell the user."""
    from lora_train.train.loop import captions_change

    n, t, d = config.network, config.training, config.dataset
    notes = []
    if not n.network_train_unet_only:
        n.network_train_unet_only, n.network_train_text_encoder_only = True, False
        notes.append("--medvram: training the UNet only (the text encoder would be swapped onto the GPU at every step)")
    if not (d.cache_latents or d.cache_latents_to_disk):
        if d.random_crop or d.color_aug:
            notes.append("--medvram: random_crop / color_aug change the pixels every step, so latents cannot be cached: "
                         "the VAE is swapped in at every step, which is slow")
        else:
            d.cache_latents = True
            notes.append("--medvram: latents are cached before the first step")
    if not t.cache_text_encoder_outputs:
        if captions_change(d) or d.dataset_config:
            notes.append("--medvram: captions change between steps (shuffle, dropout, wildcards) or come from a dataset "
                         "config, so text-encoder outputs are not cached: the text encoder is swapped in at every step, which is slow")
        else:
            t.cache_text_encoder_outputs = True
            notes.append("--medvram: text-encoder outputs are cached before the first step")
    return notes


def _pin_unet(model, device) -> None:
    """The reference notes' choreography: everything off the GPU, then the UNet on it, recorded as
    the module the WebUI's hooks believe is there (so its bookkeeping stays right)."""
    from modules import lowvram

    lowvram.send_everything_to_cpu()
    model.model.to(device)
    lowvram.module_in_gpu = model.model


def _has_fp8_weights(model) -> bool:
    try:
        import torch

        fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
        unet = model.model.diffusion_model
        return any(p.dtype in fp8 for p in unet.parameters())
    except Exception:
        return False


def restore_lora_merges(model) -> int:
    """Put back the base weights the built-in Lora extension merged into `model` in place.

    The extension merges `<lora:...>` deltas into each layer's weight and remembers which set it
    merged (`network_current_names`), with a CPU backup of the original. Returns the number of
    layers restored; afterwards the next generation merges again from the backup.
    """
    layers = [m for m in model.modules() if getattr(m, "network_current_names", ())]
    try:
        import networks
    except ImportError:
        networks = None
    if layers and networks is None:
        raise UserError("The model carries LoRA weights merged by the built-in Lora extension, which is not loaded "
                        "now, so they cannot be removed. Reload the checkpoint, then start again.")
    import torch

    with torch.no_grad():  # the WebUI calls it under no_grad; its weights still require grad
        for m in layers:
            networks.network_restore_weights_from_backup(m)
            m.network_current_names = ()
    if networks is not None:
        networks.loaded_networks.clear()
    return len(layers)


def unmatched_in_host(networks, name: str, on_disk) -> list[str]:
    """Load a LoRA file with the WebUI's own loader; the file's modules it "didn't match".

    `networks.load_network` only logs the keys it could not place (at DEBUG level), so the log
    call is captured for the duration; and every module it did place carries the file key it came
    from (`network_key`), so the file's other modules are unmatched too should the log text change.
    Returns module names (`lora_unet_...`), sorted.
    """
    capture = _LogCapture(networks.logging)
    networks.logging = capture
    try:
        net = networks.load_network(name, on_disk)
    finally:
        networks.logging = capture.real
    failed: set[str] = set()
    for message in capture.messages:
        failed.update(parse_didnt_match(message))
    placed = [getattr(m, "network_key", None) for m in (getattr(net, "modules", None) or {}).values()]
    if placed and all(placed):
        from lora_train.network.files import load_lora

        tensors, _ = load_lora(on_disk.filename)
        failed |= {k.partition(".")[0] for k in tensors} - {k.partition(".")[0] for k in placed}
    failed.discard("bundle_emb")
    return sorted(failed)


def parse_didnt_match(message: str) -> set[str]:
    """Module names from the loader's "Network FILE didn't match keys: {key: sd_key, ...}"."""
    _, found, rest = message.partition("didn't match keys: ")
    if not found:
        return set()
    try:
        keys = list(ast.literal_eval(rest.strip()))
    except (ValueError, SyntaxError):
        keys = re.findall(r"'([^']+)':", rest)
    return {str(k).partition(".")[0] for k in keys}


class _LogCapture:
    """Stands in for the `logging` module inside `networks` while a file is loaded."""

    def __init__(self, real):
        self.real = real
        self.messages: list[str] = []

    def debug(self, msg, *args, **kwargs):
        try:
            self.messages.append(str(msg) % args if args else str(msg))
        except Exception:
            self.messages.append(str(msg))
        return self.real.debug(msg, *args, **kwargs)

    def __getattr__(self, item):
        return getattr(self.real, item)


_STATE_FIELDS = ("job", "job_no", "job_count", "sampling_step", "sampling_steps", "textinfo", "processing_has_refined_job_count")


def _save_progress_state(state) -> dict:
    return {k: getattr(state, k) for k in _STATE_FIELDS if hasattr(state, k)}


def _restore_progress_state(state, saved: dict) -> None:
    for k, v in saved.items():
        setattr(state, k, v)


@contextlib.contextmanager
def _pinned_checkpoint(model):
    """Keep `process_images` from loading another checkpoint in the middle of a run.

    Choosing a checkpoint in the UI writes the setting first and then waits for `queue_lock` (which
    the run holds) to load it; `process_images` would see the new setting and load it here, into
    the model being trained. While a preview renders, the setting names the loaded model again.
    """
    from modules import shared

    title = getattr(getattr(model, "sd_checkpoint_info", None), "title", None)
    data = getattr(shared.opts, "data", None)
    if not title or not isinstance(data, dict):
        yield
        return
    key = "sd_model_checkpoint"
    had, old = key in data, data.get(key)
    data[key] = title
    try:
        yield
    finally:
        if data.get(key) == title:  # unless someone changed it meanwhile
            if had:
                data[key] = old
            else:
                data.pop(key, None)


_COND_CACHES = (("StableDiffusionProcessing", ("cached_c", "cached_uc")),
                ("StableDiffusionProcessingTxt2Img", ("cached_hr_c", "cached_hr_uc")))


@contextlib.contextmanager
def _own_cond_cache(processing):
    """Previews get empty conditioning caches of their own, and the WebUI's come back untouched.

    The WebUI caches the last prompt's and negative prompt's conditioning in class attributes, keyed
    by prompt, steps and extra networks, but not by our LoRA, which it cannot see. A preview would
    otherwise reuse a clean cached negative prompt (no text-encoder LoRA in the preview), and leave
    its own, computed with the LoRA, for the next txt2img after training to reuse."""
    saved = []
    for cls_name, attrs in _COND_CACHES:
        cls = getattr(processing, cls_name, None)
        for attr in attrs:
            if cls is not None and hasattr(cls, attr):
                saved.append((cls, attr, getattr(cls, attr)))
                setattr(cls, attr, [None, None])  # new lists: the saved ones are never written to
    try:
        yield
    finally:
        for cls, attr, value in saved:
            setattr(cls, attr, value)


# -- X/Y/Z plot axes -------------------------------------------------------------------------------
_LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?((?::[^>]*)?)>", re.IGNORECASE)


def xyz_lora_name() -> str:
    """The LoRA the axes change: Settings > LoRA Train, else the last one a run published."""
    return str(_opt(SETTING_XYZ_LORA, "") or "").strip() or (_last_published or "")


def lora_stems() -> list[str]:
    """Names of the LoRA files in the WebUI's LoRA folder (what `<lora:NAME:w>` takes)."""
    try:
        folder = A1111Host().lora_dir()
    except Exception:
        return []
    if not folder.is_dir():
        return []
    stems = {p.stem for p in folder.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.is_file()}
    return sorted(stems, key=str.casefold)


def _find_tag(prompt: str, wanted: list[str], family: str):
    tags = list(_LORA_TAG.finditer(prompt))
    for name in wanted:
        for m in tags:
            if m.group(2) == name:
                return m
    if family:
        for m in tags:
            if m.group(2) == family or m.group(2).startswith(family + "-"):
                return m
    return None


def set_lora_weight(prompt: str, weight: float, target: str = "", family: str = "") -> tuple[str, str]:
    """Set the weight of our LoRA's `<lora:...>` tag in `prompt`, or append one. -> (prompt, name)."""
    m = _find_tag(prompt, [target] if target else [], family)
    if m is None and not family:
        m = _LORA_TAG.search(prompt)
    if m is None:
        name = target or family
        if not name:
            raise RuntimeError(f"{XYZ_WEIGHT}: the prompt has no <lora:...> and no LoRA is chosen "
                               "(Settings > LoRA Train, or publish one with a run first)")
        return f"{prompt} <lora:{name}:{weight:g}>", name
    tag = f"<{m.group(1)}:{m.group(2)}:{weight:g}{m.group(4) or ''}>"
    return prompt[:m.start()] + tag + prompt[m.end():], m.group(2)


def set_lora_name(prompt: str, name: str, others: list[str], target: str = "", family: str = "") -> str:
    """Make our LoRA's `<lora:...>` tag in `prompt` use the file `name`, or append `<lora:name:1>`."""
    m = _find_tag(prompt, ([target] if target else []) + [o for o in others if o], family)
    if m is None and not family:
        m = _LORA_TAG.search(prompt)
    if m is None:
        return f"{prompt} <lora:{name}:1>"
    tag = f"<{m.group(1)}:{name}" + (f":{m.group(3)}" if m.group(3) is not None else "") + f"{m.group(4) or ''}>"
    return prompt[:m.start()] + tag + prompt[m.end():]


def apply_lora_weight(p, x, xs) -> None:
    p.prompt, name = set_lora_weight(p.prompt, float(x), getattr(p, "_lora_train_lora", ""), xyz_lora_name())
    p._lora_train_lora = name


def apply_lora_checkpoint(p, x, xs) -> None:
    p.prompt = set_lora_name(p.prompt, str(x), [str(v) for v in xs], getattr(p, "_lora_train_lora", ""), xyz_lora_name())
    p._lora_train_lora = str(x)


def confirm_lora_checkpoints(p, xs) -> None:
    known = set(lora_stems())
    try:
        import networks

        known |= set(networks.available_network_aliases)
    except Exception:
        pass
    missing = [x for x in xs if str(x) not in known]
    if missing:
        raise RuntimeError(f"{XYZ_CHECKPOINT}: no LoRA named {', '.join(map(str, missing))} in {A1111Host().lora_dir()}")


def install_xyz_axes() -> bool:
    """Add our axes to the built-in X/Y/Z plot script. Call from `on_before_ui` (its dropdowns are
    built with the UI). Returns False when the script is missing or the axes are already there."""
    from modules import scripts

    xyz = next((s.module for s in scripts.scripts_data if s.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return False
    if any(str(getattr(o, "label", "")).startswith(XYZ_PREFIX) for o in xyz.axis_options):
        return False
    xyz.axis_options.extend([
        xyz.AxisOption(XYZ_WEIGHT, float, apply_lora_weight, format_value=xyz.format_value_add_label),
        xyz.AxisOption(XYZ_CHECKPOINT, str, apply_lora_checkpoint, format_value=xyz.format_value_add_label,
                       confirm=confirm_lora_checkpoints, choices=lora_stems),
    ])
    return True
