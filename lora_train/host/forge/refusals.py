"""Why a run cannot start on Forge as it is now: one line each, saying what to change."""

from __future__ import annotations

import torch

from lora_train.errors import msg
from lora_train.model.forge import forge_family

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_NAMES = {"sd2": "SD2", "sdxl_refiner": "the SDXL refiner", "sd3": "SD3", "flux": "Flux", "chroma": "Chroma"}


def quantised(kmodel) -> str | None:
    """The low-bit format of Forge's UNet weights (nf4, fp4, gguf, fp8, ...), or None for float16/32."""
    storage = getattr(kmodel, "storage_dtype", None)
    if storage in ("nf4", "fp4", "gguf") or (isinstance(storage, torch.dtype) and storage in _FP8):
        return str(storage).replace("torch.", "")
    for module in kmodel.diffusion_model.modules():
        if "scale_weight" in module._parameters:
            return "fp8 (scaled)"
        for p in module._parameters.values():
            if p is None:
                continue
            if hasattr(p, "bnb_quantized"):
                return "bnb 4-bit"
            if hasattr(p, "gguf_cls"):
                return "GGUF"
            if p.dtype in _FP8:
                return str(p.dtype).replace("torch.", "")
    return None


def model_problems(model, low_bits_chosen: bool = True) -> list[str]:
    """What makes Forge's loaded `model` untrainable for LoRA Train. `low_bits_chosen`: 'Diffusion in Low
    Bits' still asks for quantised weights (False: it is back at Automatic, but Forge keeps the model it
    loaded until something loads it again)."""
    family = forge_family(model)
    if family not in ("sd1", "sdxl"):
        kind = _NAMES.get(family, family)
        return [msg("The loaded checkpoint is {kind}, which LoRA Train cannot train in Forge. Load an SD1.x or SDXL checkpoint.", kind=kind)]
    problems = []
    if getattr(model, "is_inpaint", False):
        problems.append(msg("The loaded checkpoint is an inpainting model: LoRA Train trains text-to-image models only. Load a normal checkpoint."))
    kmodel = model.forge_objects_original.unet.model
    low_bits = quantised(kmodel)
    if low_bits and low_bits_chosen:
        problems.append(msg("The UNet weights are quantised ({kind}), which cannot be trained on: set 'Diffusion in Low Bits' to "
                            "Automatic and load a float16/float32 checkpoint.", kind=low_bits))
    elif low_bits:
        problems.append(msg("Forge still holds the UNet quantised ({kind}) from before 'Diffusion in Low Bits' was set to Automatic: "
                            "generate one image so that Forge loads the checkpoint again, then start.", kind=low_bits))
    prediction = getattr(kmodel.predictor, "prediction_type", None)
    if prediction not in ("epsilon", "v_prediction"):
        problems.append(msg("This Forge model predicts '{kind}', which LoRA Train cannot train (eps or v only).", kind=prediction))
    return problems


def preflight(config) -> list[str]:
    from lora_train.host.forge.engine import chosen_checkpoint, loaded_model

    model = loaded_model()
    if model is None:
        if chosen_checkpoint() is None:
            return [msg("No checkpoint is loaded: choose one in the 'Stable Diffusion checkpoint' list at the top of the page, then start again.")]
        return _chosen_low_bits()  # loaded (and checked again) when the run starts
    chosen = _chosen_low_bits()
    return model_problems(model, low_bits_chosen=bool(chosen)) or chosen


def _chosen_low_bits() -> list[str]:
    from modules import sd_models

    chosen = (sd_models.model_data.forge_loading_parameters or {}).get("unet_storage_dtype")
    if chosen is None:
        return []
    return [msg("'Diffusion in Low Bits' is {kind}: the UNet weights would be quantised, which cannot be trained on. Set it to Automatic.",
                kind=str(chosen).replace("torch.", ""))]
