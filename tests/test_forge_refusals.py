"""Forge's untrainable weights are refused in one line each (host/forge/refusals.py).

No nf4 / GGUF / fp8 checkpoint is at hand, so the weights are stand-ins carrying the marks Forge's own
classes carry (read in Forge dfdcbab6): bitsandbytes' Params4bit has `bnb_quantized`
(backend/operations_bnb.py), ParameterGGUF has `gguf_cls` (backend/operations_gguf.py, None for a
GGUF file's unquantised tensors, still not trainable), a scaled-fp8 Linear registers a `scale_weight`
parameter (backend/operations.py), and the loader writes `storage_dtype` onto the KModel
(backend/loader.py). Each case is checked against a float model built the same way, which must pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lora_train.host.forge.refusals import model_problems, quantised


class Params4bit(nn.Parameter):
    bnb_quantized = False  # set on bitsandbytes' class before the first move to CUDA too


class ParameterGGUF(nn.Parameter):
    gguf_cls = None  # what Forge sets for an F16 tensor inside a GGUF file


def _unet(weight=None, scale_weight: bool = False, dtype=torch.float16) -> nn.Module:
    unet = nn.Sequential(nn.Linear(4, 4).to(dtype), nn.Linear(4, 4).to(dtype))
    if weight is not None:
        unet[1].weight = weight
    if scale_weight:
        unet[1].scale_weight = nn.Parameter(torch.ones(()))
    return unet


def _kmodel(unet: nn.Module, storage=torch.float16, prediction: str = "epsilon"):
    return SimpleNamespace(storage_dtype=storage, diffusion_model=unet, predictor=SimpleNamespace(prediction_type=prediction))


class StableDiffusion(SimpleNamespace):  # forge_family reads Forge's engine class name
    pass


def _engine(kmodel, inpaint: bool = False):
    return StableDiffusion(is_inpaint=inpaint, forge_objects_original=SimpleNamespace(unet=SimpleNamespace(model=kmodel)))


CASES = {
    "nf4 storage": (_kmodel(_unet(), storage="nf4"), "nf4"),
    "gguf storage": (_kmodel(_unet(), storage="gguf"), "gguf"),
    "bnb weight": (_kmodel(_unet(Params4bit(torch.zeros(4, 4), requires_grad=False))), "bnb 4-bit"),
    "gguf weight": (_kmodel(_unet(ParameterGGUF(torch.zeros(4, 4), requires_grad=False))), "GGUF"),
    "scaled fp8": (_kmodel(_unet(scale_weight=True)), "fp8 (scaled)"),
}
if hasattr(torch, "float8_e4m3fn"):
    CASES["fp8 storage"] = (_kmodel(_unet(), storage=torch.float8_e4m3fn), "float8_e4m3fn")
    CASES["fp8 weight"] = (_kmodel(_unet(nn.Parameter(torch.zeros(4, 4).to(torch.float8_e4m3fn), requires_grad=False))), "float8_e4m3fn")


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantised_weights_are_named_and_refused(case):
    kmodel, kind = CASES[case]
    assert quantised(kmodel) == kind
    problems = model_problems(_engine(kmodel))
    assert len(problems) == 1 and f"({kind})" in problems[0] and "\n" not in problems[0], problems


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_float_weights_pass(dtype):
    kmodel = _kmodel(_unet(dtype=dtype), storage=dtype)
    assert quantised(kmodel) is None
    assert model_problems(_engine(kmodel)) == []


def test_inpainting_and_other_predictions_are_refused_each_in_their_own_line():
    problems = model_problems(_engine(_kmodel(_unet(), prediction="flow"), inpaint=True))
    assert len(problems) == 2
    assert "inpainting" in problems[0] and "'flow'" in problems[1]


@pytest.mark.parametrize("family,word", [("Flux", "Flux"), ("StableDiffusion3", "SD3"), ("StableDiffusion2", "SD2"),
                                         ("StableDiffusionXLRefiner", "refiner")])
def test_other_families_are_refused_before_their_weights_are_read(family, word):
    engine = type(family, (SimpleNamespace,), {})(forge_objects_original=None)  # reading the weights would raise
    problems = model_problems(engine)
    assert len(problems) == 1 and word in problems[0]


def test_a_model_still_quantised_after_the_setting_went_back_says_to_reload():
    """By hand in Forge: with 'Diffusion in Low Bits' set back to Automatic and nothing generated since,
    Forge still held the fp8 UNet, and the line told the user to set Automatic, which they had."""
    kmodel, kind = CASES["nf4 storage"]
    (line,) = model_problems(_engine(kmodel), low_bits_chosen=False)
    assert "still holds" in line and f"({kind})" in line and "generate one image" in line
    assert model_problems(_engine(kmodel)) != [line], "while the setting asks for low bits, the other line"
