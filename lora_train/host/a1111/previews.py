"""Preview images during a run, rendered by the WebUI's own txt2img, which must leave the WebUI's state
(progress display, RNG, conditioning caches, chosen checkpoint) as it found it."""

from __future__ import annotations

import contextlib
import logging
import traceback
from pathlib import Path
from typing import Optional

from lora_train.host.a1111.webui import SETTING_PREVIEW_STEPS, opt

log = logging.getLogger(__name__)

# sd-scripts' sample sampler names -> the WebUI's
A1111_SAMPLERS = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2M",
}
DEFAULT_A1111_SAMPLER = "Euler a"


def sample_fn(host, config, adapter, prompts, folder, pinned=None):
    """Previews through the WebUI's own txt2img on the model being trained (the LoRA is on it already).
    `pinned()`: the context each round of previews renders in, keeping the WebUI from switching models
    meanwhile (default: the A1111 WebUI's `_pinned_checkpoint`; Forge has its own, host/forge/previews.py)."""
    from lora_train.sample.previews import preview_prompts, sample_stem
    from lora_train.sample.render import save_png

    if not prompts:
        return None
    size = host.model_resolution()
    steps = int(opt(SETTING_PREVIEW_STEPS, 20) or 20)
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
            with (pinned() if pinned is not None else _pinned_checkpoint(adapter.model)), _own_cond_cache(processing):
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

    sample.prompts = parsed  # what each sample event renders: the estimate prices it
    return sample


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

