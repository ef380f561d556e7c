"""Why a run cannot start on the WebUI as it is now (a message each, saying what to change)."""

from __future__ import annotations

from lora_train.host.a1111.webui import family, loaded_model, opt


def preflight(config) -> list[str]:
    from modules import shared

    problems = []
    cmd = shared.cmd_opts
    if getattr(cmd, "lowvram", False):
        problems.append("The WebUI runs with --lowvram: it moves each UNet block off the GPU right after its "
                        "forward pass, which breaks training's backward pass. Restart the WebUI without --lowvram.")
    model = loaded_model()
    if model is None:
        problems.append("No checkpoint is loaded: choose one in the 'Stable Diffusion checkpoint' list at the top "
                        "of the page (and wait until it has loaded), then start again.")
        return problems
    kind = family(model)
    if kind == "sd3":
        problems.append("The loaded checkpoint is SD3, which LoRA Train cannot train. Load an SD1.x or SD2.x checkpoint.")
    elif kind == "sdxl" and not hasattr(getattr(model, "model", None), "diffusion_model"):
        problems.append(f"The loaded SDXL model ({type(model).__name__}) has no sgm UNet LoRA Train knows.")
    fp8 = str(opt("fp8_storage", "Disable"))
    if fp8 == "Enable" or (fp8 == "Enable for SDXL" and kind == "sdxl") or _has_fp8_weights(model):
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
    if kind in ("sd1", "sd2") and not (hasattr(model, "cond_stage_model") and hasattr(model, "model")):
        problems.append(f"The loaded model ({type(model).__name__}) is not a Stable Diffusion 1.x/2.x model LoRA Train knows.")
    return problems



def _has_fp8_weights(model) -> bool:
    try:
        import torch

        fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
        unet = model.model.diffusion_model
        return any(p.dtype in fp8 for p in unet.parameters())
    except Exception:
        return False
