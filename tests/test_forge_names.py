"""A LoRA trained in Forge has the kohya names A1111, sd-scripts and ComfyUI use: the targets our Forge
adapter collects on Forge's own module trees (rebuilt from recorded fixtures, see forge_trees.py) are
named as on the ldm/HF models the A1111 host trains, and every name lands, in Forge's own LoRA key map,
on exactly the weight it was collected from."""

from __future__ import annotations

import forge_trees
import pytest

from lora_train.model.forge import ForgeAdapter
from lora_train.model.reference import reference_targets
from lora_train.network.module import target_weight_shape
from lora_train.network.targets import Target

FORGE_TE = {"lora_te": "clip_l", "lora_te1": "clip_l", "lora_te2": "clip_g"}


def forge_key(target: Target) -> str:
    """The Forge parameter key a target's weight has (what Forge's key map must map its name to)."""
    if target.name.startswith("lora_unet_"):
        return f"diffusion_model.{target.path}.weight"
    prefix = target.name.split("_text_model_")[0]
    return f"{FORGE_TE[prefix]}.transformer.{target.path}.weight"


def mismatches(targets: list[Target], keymap: dict) -> list[str]:
    both = {**keymap["unet"], **keymap["clip"]}
    return [t.name for t in targets if both.get(t.name) != forge_key(t)]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def forge(request):
    return request.param, forge_trees.engine(request.param)


def test_forge_trees_have_forge_linear_not_torch_linear(forge):
    from torch import nn

    _tag, engine = forge
    unet = engine.forge_objects_original.unet.model.diffusion_model
    linears = [m for m in unet.modules() if type(m).__name__ == "Linear"]
    assert linears and not any(isinstance(m, nn.Linear) for m in linears)


def test_every_target_name_is_in_forge_key_map_on_its_own_weight(forge):
    tag, engine = forge
    targets = ForgeAdapter(engine).lora_targets(conv=True)
    unet = [t for t in targets if t.name.startswith("lora_unet_")]
    te = [t for t in targets if not t.name.startswith("lora_unet_")]
    # full-size counts (NOTES, crosscheck): SD1.5 278 UNet + 72 TE; SDXL 788 UNet + 72 + 192 TE
    assert (len(unet), len(te)) == {"sd15": (278, 72), "sdxl": (788, 264)}[tag]
    assert mismatches(targets, engine.keymap) == []


def test_names_and_shapes_equal_what_a1111_trains(forge):
    tag, engine = forge
    ours = {t.name: tuple(target_weight_shape(t.module)) for t in ForgeAdapter(engine).lora_targets(conv=True)}
    a1111 = {t.name: tuple(target_weight_shape(t.module)) for t in reference_targets(tag, conv=True)}
    assert ours == a1111


def test_a_wrong_name_is_caught(forge):
    tag, engine = forge
    targets = ForgeAdapter(engine).lora_targets(conv=False)
    good = targets[-1]  # a UNet target
    wrong = [Target(good.name + "_x", good.module, good.path),  # no such key
             Target(targets[0].name, good.module, good.path)]  # a real name on another module's weight
    assert mismatches(wrong, engine.keymap) == [wrong[0].name, wrong[1].name]
    # SDXL-style (ldm path) UNet names on SD1.5 would not be the names A1111 and sd-scripts use
    if tag == "sd15":
        from lora_train.network.targets import sdxl_unet_targets

        ldm_named = {t.name for t in sdxl_unet_targets(engine.forge_objects_original.unet.model.diffusion_model)}
        assert ldm_named.isdisjoint({t.name for t in reference_targets("sd15")})
