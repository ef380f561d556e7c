"""One run on the WebUI: the queue lock, the task the progress API reports, and the adapter over the
loaded model; and the run's progress in the WebUI's own display."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from lora_train.errors import UserError
from lora_train.host.a1111.memory import medvram, medvram_config, pin_unet, restore_lora_merges
from lora_train.host.a1111.refusals import preflight
from lora_train.host.a1111.webui import loaded_model, opt, task_id

log = logging.getLogger(__name__)


@contextlib.contextmanager
def holding(host, config, run_id: str):
    """The WebUI held for one run (Forge's too): its queue lock, taken in this thread, and the run as a
    task of its progress API and `shared.state`; `host` records the lock owner and task."""
    from modules import call_queue, progress, shared

    task = task_id(run_id)
    progress.add_task_to_queue(task)  # the progress API says "In queue" while we wait
    call_queue.queue_lock.acquire()
    host.owner_thread = threading.get_ident()
    try:
        shared.state.begin(job=task)
        progress.start_task(task)
        host.task, host.run_name, host.total_steps = task, config.saving.output_name or "", 0
        try:
            yield task
        finally:
            host.task = None
            progress.finish_task(task)
            shared.state.end()
    finally:
        host.owner_thread = None
        call_queue.queue_lock.release()


@contextlib.contextmanager
def session(host, config, run_id: str):
    """Hold the WebUI for one run (see the package docstring)."""
    from modules import shared

    from lora_train.model.registry import with_options
    from lora_train.model.select import adapter_for, hosted_notes

    with holding(host, config, run_id):
        problems = preflight(config)  # again: the model may have changed while we waited
        if problems:
            raise UserError("\n".join(problems))
        model = loaded_model()
        restore_lora_merges(model)
        shared.loaded_hypernetworks = []
        shared.state.textinfo = f"LoRA Train: preparing {host.run_name} ..."
        # ss_sd_model_name / ss_sd_model_hash come from the checkpoint file the WebUI loaded
        filename = getattr(getattr(model, "sd_checkpoint_info", None), "filename", None) or getattr(model, "sd_model_checkpoint", None)
        from modules import devices

        # the WebUI's main device, not wherever the UNet happens to be: --medvram moves it
        adapter = adapter_for(model, name=os.path.basename(filename) if filename else None,
                              clip_skip=int(opt("CLIP_stop_at_last_layers", 1) or 1), device=devices.device)
        adapter.info.path = filename
        adapter.host_attention = True  # the cross-attention optimisation chosen in the WebUI's settings stays
        with_options(adapter, config.model)
        adapter.info.notes += hosted_notes(config.model, adapter)
        if medvram(model):
            adapter.info.notes += medvram_config(config)
            pin_unet(model, devices.device)
        yield adapter


def report_progress(host, e) -> None:
    """Every training event, into the WebUI's progress display (`shared.state`)."""
    from lora_train.train import events as ev

    if host.task is None:
        return
    try:
        from modules import shared

        state = shared.state
        name = host.run_name
        if isinstance(e, ev.Started):
            host.total_steps = e.total_steps
            state.job_count, state.job_no = e.total_steps, 0
            state.sampling_steps = state.sampling_step = 0
            state.textinfo = f"LoRA Train: {name}: {e.num_images} images, {e.epochs} epochs, {e.total_steps} steps"
        elif isinstance(e, ev.Step):
            state.job_no = e.step
            state.textinfo = f"LoRA Train: {name}: step {e.step}/{host.total_steps}, epoch {e.epoch}, loss {e.loss:.4f}"
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
