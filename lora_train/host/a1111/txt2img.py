"""The WebUI's own txt2img on its loaded checkpoint, with no LoRA: the images the model makes itself
(regularization images, the base-style LoRA's dataset). Each image is one job in the WebUI's
progress display and one line in its log."""

from __future__ import annotations

import contextlib
import logging

from lora_train.errors import UserError, msg
from lora_train.host.a1111.previews import a1111_sampler
from lora_train.host.a1111.webui import TASK_PREFIX, loaded_model

log = logging.getLogger(__name__)


def txt2img(host, prompts, prepare=None) -> list:
    """`prepare(model)`: called with the queue lock held, before the first image (Forge: no stale LoRA)."""
    if host.owner_thread is not None:
        raise UserError(msg("A training run is using the model right now: render the images when it has finished (or stop it)."))
    from modules import call_queue, processing, shared

    images = []
    with call_queue.queue_lock:
        shared.state.begin(job=f"{TASK_PREFIX}txt2img")
        try:
            if loaded_model() is None:
                raise UserError(msg("No checkpoint is loaded."))
            if prepare is not None:
                prepare(loaded_model())
            shared.state.job_count = len(prompts)
            for i, sp in enumerate(prompts):
                shared.state.interrupted = shared.state.skipped = False
                log.info("LoRA Train: txt2img %d/%d, seed %s: %s", i + 1, len(prompts), sp.seed, sp.prompt)
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=shared.sd_model, prompt=sp.prompt, negative_prompt=sp.negative, steps=sp.steps,
                    width=sp.width, height=sp.height, cfg_scale=sp.scale, seed=sp.seed, sampler_name=a1111_sampler(sp.sampler),
                    batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
                )
                p.disable_extra_networks = True  # the model's own images: no <lora:...> in a caption applies
                with contextlib.closing(p):
                    processed = processing.process_images(p)
                if not processed.images:
                    raise UserError(msg("The WebUI returned no image (interrupted?)"))
                images.append(processed.images[0])
        finally:
            shared.state.end()
    return images


def model_key() -> str:
    """The checkpoint's sha256 when the WebUI has computed it, else its short hash or title."""
    info = getattr(loaded_model(), "sd_checkpoint_info", None)
    for attr in ("sha256", "shorthash", "hash", "title"):
        value = getattr(info, attr, None)
        if value:
            return f"{attr}:{value}"
    return "unknown"
