"""kohya UNet names map back to the ldm module they came from.

The expected direction is the host's: A1111 turns `lora_unet_<diffusers path>` into an ldm path by
the rules below (documented in ../shared/reference/trainers.md, section 2), then looks the module up.
If every one of our names lands on the module it was made for, the host matches every key.
"""

import re

from lora_train.network.naming import ldm_unet_path_to_diffusers

RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm(name: str) -> str:
    """The documented diffusers -> LDM rules, written from the reference notes."""
    name = name.removeprefix("lora_unet_")
    if m := re.match(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"middle_block_{1 if kind == 'attentions' else 2 * j}_{rest}"
    if m := re.match(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"up_blocks_(\d+)_upsamplers_0_conv", name):
        i = int(m[1])
        return f"output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv"
    raise AssertionError(f"unmapped {name}")


def test_every_unet_name_maps_back_to_its_module(tiny_adapter):
    targets = [t for t in tiny_adapter.lora_targets(conv=True) if t.name.startswith("lora_unet_")]
    assert targets
    for t in targets:
        assert diffusers_to_ldm(t.name) == t.path.replace(".", "_"), t.name


def test_known_examples():
    assert ldm_unet_path_to_diffusers("input_blocks.4.1", "SpatialTransformer", "proj_in") == "down_blocks.1.attentions.0.proj_in"
    assert ldm_unet_path_to_diffusers("input_blocks.3.0", "Downsample", "op") == "down_blocks.0.downsamplers.0.conv"
    assert ldm_unet_path_to_diffusers("middle_block.2", "ResBlock", "in_layers.2") == "mid_block.resnets.1.conv1"
    assert ldm_unet_path_to_diffusers("output_blocks.2.1", "Upsample", "conv") == "up_blocks.0.upsamplers.0.conv"
    assert ldm_unet_path_to_diffusers("output_blocks.8.2", "Upsample", "conv") == "up_blocks.2.upsamplers.0.conv"
    assert ldm_unet_path_to_diffusers("output_blocks.11.0", "ResBlock", "skip_connection") == "up_blocks.3.resnets.2.conv_shortcut"
