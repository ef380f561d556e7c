"""Why a run cannot start on the WebUI as it is now (a message each, saying what to change)."""

from __future__ import annotations

from lora_train.errors import msg
from lora_train.host.a1111.webui import family, loaded_model, opt


def preflight(config) -> list[str]:
    from modules import shared

    problems = []
    cmd = shared.cmd_opts
    if getattr(cmd, "lowvram", False):
        problems.append(msg("The WebUI runs with --lowvram: it moves each UNet block off the GPU right after its "
                            "forward pass, which breaks training's backward pass. Restart the WebUI without --lowvram."))
    model = loaded_model()
    if model is None:
        problems.append(msg("No checkpoint is loaded: choose one in the 'Stable Diffusion checkpoint' list at the top "
                            "of the page (and wait until it has loaded), then start again."))
        return problems
    kind = family(model)
    if kind == "sd3":
        problems.append(msg("The loaded checkpoint is SD3, which LoRA Train cannot train. Load an SD1.x, SD2.x or SDXL checkpoint."))
    elif kind == "sdxl" and not hasattr(getattr(model, "model", None), "diffusion_model"):
        problems.append(msg("The loaded SDXL model ({kind}) has no sgm UNet LoRA Train knows.", kind=type(model).__name__))
    fp8 = str(opt("fp8_storage", "Disable"))
    if fp8 == "Enable" or (fp8 == "Enable for SDXL" and kind == "sdxl") or _has_fp8_weights(model):
        problems.append(msg("Settings > Optimizations > FP8 weight is '{fp8}': the weights of the model are stored in "
                            "8-bit floats, which cannot be trained on. Set it to 'Disable' (the model reloads), then start again.", fp8=fp8))
    try:
        from modules import sd_unet

        unet = sd_unet.current_unet
    except Exception:
        unet = None
    if unet is not None:
        label = getattr(getattr(unet, "option", None), "label", type(unet).__name__)
        problems.append(msg("A replacement UNet is active ({unet}, Settings > Stable Diffusion > SD Unet): it "
                            "bypasses the UNet of the model, so nothing could be trained. Set SD Unet to 'None'.", unet=label))
    conditioning = getattr(getattr(model, "model", None), "conditioning_key", None)
    if conditioning in ("hybrid", "concat") or getattr(model, "is_sdxl_inpaint", False):
        problems.append(msg("The loaded checkpoint is an inpainting/instruct-pix2pix/depth model (conditioning "
                            "'{conditioning}'): LoRA Train trains text-to-image models only. Load a normal checkpoint.",
                            conditioning=conditioning))
    if kind in ("sd1", "sd2") and not (hasattr(model, "cond_stage_model") and hasattr(model, "model")):
        problems.append(msg("The loaded model ({kind}) is not a Stable Diffusion 1.x/2.x model LoRA Train knows.",
                            kind=type(model).__name__))
    return problems



def _has_fp8_weights(model) -> bool:
    try:
        import torch

        fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
        unet = model.model.diffusion_model
        return any(p.dtype in fp8 for p in unet.parameters())
    except Exception:
        return False
