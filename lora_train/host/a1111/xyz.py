"""Comparing a LoRA in the WebUI: our two axes in the built-in X/Y/Z plot script (weight, and which
file), and the epochs x weights grid the tab renders through txt2img."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Optional

from lora_train.errors import UserError, msg
from lora_train.host.a1111.previews import DEFAULT_A1111_SAMPLER
from lora_train.host.a1111.webui import LORA_EXTENSIONS, SETTING_XYZ_LORA, TASK_PREFIX, lora_dir, loaded_model, opt

XYZ_PREFIX = "[LoRA Train]"
XYZ_WEIGHT = f"{XYZ_PREFIX} LoRA weight"
XYZ_CHECKPOINT = f"{XYZ_PREFIX} LoRA checkpoint"
XYZ_BLOCKS = f"{XYZ_PREFIX} block weights"

_last_published: Optional[str] = None  # stem of the last LoRA a run published (the XYZ axes' default)


def remember_published(stem: str) -> None:
    global _last_published
    _last_published = stem


_LORA_TAG = re.compile(r"<(lora|lyco):([^:>]+)(?::([^:>]*))?((?::[^>]*)?)>", re.IGNORECASE)


def xyz_lora_name() -> str:
    """The LoRA the axes change: Settings > LoRA Train, else the last one a run published."""
    return str(opt(SETTING_XYZ_LORA, "") or "").strip() or (_last_published or "")


def lora_stems() -> list[str]:
    """Names of the LoRA files in the WebUI's LoRA folder (what `<lora:NAME:w>` takes)."""
    try:
        folder = lora_dir()
    except Exception:
        return []
    if not folder.is_dir():
        return []
    stems = {p.stem for p in folder.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.is_file()}
    return sorted(stems, key=str.casefold)


def find_tag(prompt: str, wanted: list[str], family: str):
    """Our LoRA's `<lora:...>` tag in `prompt`: one named in `wanted`, else one of `family` (NAME or
    NAME-...); with no family chosen, the prompt's first LoRA tag. None when there is none."""
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
    return tags[0] if tags else None


def no_lora_chosen(axis: str) -> RuntimeError:
    return RuntimeError(msg("{axis}: the prompt has no <lora:...> and no LoRA is chosen (Settings > LoRA Train, or publish one with a run first)",
                            axis=axis))


def set_lora_weight(prompt: str, weight: float, target: str = "", family: str = "") -> tuple[str, str]:
    """Set the weight of our LoRA's `<lora:...>` tag in `prompt`, or append one. -> (prompt, name)."""
    m = find_tag(prompt, [target] if target else [], family)
    if m is None:
        name = target or family
        if not name:
            raise no_lora_chosen(XYZ_WEIGHT)
        return f"{prompt} <lora:{name}:{weight:g}>", name
    tag = f"<{m.group(1)}:{m.group(2)}:{weight:g}{m.group(4) or ''}>"
    return prompt[:m.start()] + tag + prompt[m.end():], m.group(2)


def set_lora_name(prompt: str, name: str, others: list[str], target: str = "", family: str = "") -> str:
    """Make our LoRA's `<lora:...>` tag in `prompt` use the file `name`, or append `<lora:name:1>`."""
    m = find_tag(prompt, ([target] if target else []) + [o for o in others if o], family)
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
    if getattr(p, "_lora_train_lbw", None) is not None:  # the block-weights axis came first: bake this file too
        from lora_train.host.a1111.xyz_blocks import apply_block_weights

        apply_block_weights(p, p._lora_train_lbw, None)


def confirm_lora_checkpoints(p, xs) -> None:
    known = set(lora_stems())
    try:
        import networks

        known |= set(networks.available_network_aliases)
    except Exception:
        pass
    missing = [x for x in xs if str(x) not in known]
    if missing:
        raise RuntimeError(f"{XYZ_CHECKPOINT}: no LoRA named {', '.join(map(str, missing))} in {lora_dir()}")


def install_xyz_axes() -> bool:
    """Add our axes to the built-in X/Y/Z plot script. Call from `on_before_ui` (its dropdowns are
    built with the UI). Returns False when the script is missing or the axes are already there."""
    from modules import scripts

    from lora_train.host.a1111 import xyz_blocks as lbw_axis

    xyz = next((s.module for s in scripts.scripts_data if s.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return False
    if any(str(getattr(o, "label", "")).startswith(XYZ_PREFIX) for o in xyz.axis_options):
        return False
    xyz.axis_options.extend([
        xyz.AxisOption(XYZ_WEIGHT, float, apply_lora_weight, format_value=xyz.format_value_add_label),
        xyz.AxisOption(XYZ_CHECKPOINT, str, apply_lora_checkpoint, format_value=xyz.format_value_add_label,
                       confirm=confirm_lora_checkpoints, choices=lora_stems),
        # value lists contain commas: typed quoted, with "Use text inputs instead of dropdowns" ticked
        xyz.AxisOption(XYZ_BLOCKS, str, lbw_axis.apply_block_weights, format_value=lbw_axis.format_block_weights,
                       confirm=lbw_axis.confirm_block_weights, choices=lbw_axis.preset_names),
    ])
    return True


def render_grid(host, files, weights, prompt, seed, out):
    """Epochs x weights through the WebUI's txt2img with `<lora:NAME:W>` (outside a run only)."""
    if host.owner_thread is not None:
        raise UserError(msg("A training run is using the model right now: make the grid when it has finished (or stop it)."))
    from modules import call_queue, images, processing, shared

    files, weights, out = [Path(f) for f in files], [float(w) for w in weights], Path(out)
    if not files or not weights:
        raise UserError(msg("The grid needs at least one LoRA file and one weight."))
    with call_queue.queue_lock:
        shared.state.begin(job=f"{TASK_PREFIX}grid")
        try:
            if loaded_model() is None:
                raise UserError(msg("No checkpoint is loaded."))
            try:
                import networks

                networks.list_available_networks()
            except ImportError:
                raise UserError(msg("The WebUI's built-in Lora extension is disabled: <lora:...> prompts do nothing.")) from None
            size = host.model_resolution()
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
                        raise UserError(msg("The WebUI returned no image (interrupted?)"))
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

