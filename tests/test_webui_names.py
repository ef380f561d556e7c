"""Every LoRA module name we give the tiny models is one the real A1111 WebUI's loader mapped on them
(recorded by hand from the real WebUI: tests/fixtures/README.md), so a naming regression fails here."""

from __future__ import annotations

import pytest

from lora_train.model.loading import quiet
from lora_train.model.registry import load_adapter
from lora_train.network.network import LoRANetwork
from webui_names import webui_names, webui_unmapped


@pytest.mark.parametrize("spec, recorded", [("builtin:tiny", "tiny"), ("builtin:tinybase", "sd1"), ("builtin:tiny-sdxl", "sdxl")])
def test_every_name_in_a_file_we_write_is_one_the_real_webui_maps(spec, recorded):
    with quiet():
        adapter = load_adapter(spec)
    # the names of a published file: LoRA + LoCon over every target, both text encoders
    net = LoRANetwork(adapter.lora_targets(conv=True), 4, 1.0, conv_dim=4, conv_alpha=1.0)
    ours = {key.partition(".")[0] for key in net.state_dict()}
    mapped = webui_names(recorded)
    assert not sorted(ours - mapped), f"names the real WebUI did not map on {recorded}: {sorted(ours - mapped)[:5]}"
    assert not sorted(mapped - ours), f"modules the real WebUI maps that we no longer train: {sorted(mapped - ours)[:5]}"


def test_the_recorded_lists_tell_a_slip_from_a_name():
    for model in ("sd1", "tiny", "sdxl"):
        names, slips = webui_names(model), webui_unmapped(model)
        assert len(names) > 250 and slips and not set(slips) & names
    assert any(n.startswith("lora_te1_") for n in webui_names("sdxl")) and any(n.startswith("lora_te2_") for n in webui_names("sdxl"))
    assert not any(n.startswith("lora_te_") for n in webui_names("sdxl"))
    assert any(n.startswith("lora_te_") for n in webui_names("sd1")) and not any(n.startswith("lora_te2_") for n in webui_names("sd1"))
    # conv included: LoCon on 3x3 convs and 1x1 shortcuts (names the real loader maps through its resnet table)
    assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"} <= webui_names("sd1")
