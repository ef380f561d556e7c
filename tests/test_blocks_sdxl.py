"""Block-wise ranks and learning rates on SDXL, whose UNet module names are LDM paths: sd-scripts'
SDXL layout (23 blocks: BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT; 9 LR weights a side), and
SD1/SD2 as before (25 blocks, 12 a side). Full-size targets from meta-device models."""

import re

import pytest

from lora_train.errors import UserError
from lora_train.network import blocks
from lora_train.network.blocks import LrWeights
from lora_train.network.network import LoRANetwork
from lora_train.model.reference import reference_targets

SDXL_LABELS = "BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT"


@pytest.fixture(scope="module")
def xl_targets():
    return reference_targets("sdxl", conv=True)


@pytest.fixture(scope="module")
def sd_targets():
    return reference_targets("sd15", conv=True)


def sdxl_block(name: str) -> int:
    """sd-scripts' get_block_index(name, is_sdxl=True), written out for the UNet names we train."""
    m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
    assert m, name
    return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)] + int(m.group(2))


def csv(values) -> str:
    return ",".join(str(v) for v in values)


def test_sdxl_block_dims_and_alphas_set_each_blocks_rank(xl_targets):
    dims = [(i % 6) + 1 for i in range(23)]
    dims[21] = 0  # OUT08: no LoRA there
    alphas = [d / 2 for d in dims]
    conv_dims = [(i % 4) + 2 for i in range(23)]
    net = LoRANetwork(xl_targets, dim=8, alpha=8.0, conv_dim=3, conv_alpha=1.0, block_dims=csv(dims), block_alphas=csv(alphas),
                      conv_block_dims=csv(conv_dims))
    assert net.layout is blocks.SDXL
    modules = net.lora_modules
    unet = [t for t in xl_targets if t.name.startswith("lora_unet_")]
    assert {sdxl_block(t.name) for t in unet} == set(range(2, 22))  # BASE, IN00 (conv_in) and OUT have none
    for t in unet:
        idx = sdxl_block(t.name)
        if t.is_conv3x3:
            assert modules[t.name].lora_dim == conv_dims[idx] and float(modules[t.name].alpha) == 1.0, t.name
        elif idx == 21:
            assert t.name not in modules
        else:
            assert (modules[t.name].lora_dim, float(modules[t.name].alpha)) == (dims[idx], alphas[idx]), t.name
    te = [m for n, m in modules.items() if not n.startswith("lora_unet_")]
    assert len(te) == 72 + 192 and all(m.lora_dim == 8 for m in te)  # text encoders have no block


@pytest.mark.parametrize("key", ["block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"])
def test_sdxl_refuses_the_sd_count(xl_targets, key):
    args = {"conv_block_dims": csv([4] * 23)} if key == "conv_block_alphas" else {}  # alphas need their dims
    args[key] = csv([4] * 25)
    with pytest.raises(UserError) as raised:
        LoRANetwork(xl_targets, dim=4, **args)
    assert str(raised.value) == f"{key} needs 23 comma-separated values on SDXL ({SDXL_LABELS}), got 25"


def test_sdxl_lr_weights_follow_9_values_a_side(xl_targets):
    down = [round(0.1 * (i + 1), 2) for i in range(9)]
    up = [round(0.05 * (i + 1), 2) for i in range(9)]
    weights = LrWeights(csv(down), 0.33, csv(up))
    net = LoRANetwork(xl_targets, dim=2, conv_dim=2, lr_weights=weights)
    groups = net.param_groups(1.0, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, m in net.lora_modules.items():
        if not name.startswith("lora_unet_"):
            assert lr_of[id(m.lora_down.weight)] == 0.5
            continue
        idx = sdxl_block(name)
        want = down[idx - 1] if idx < 10 else 0.33 if idx < 13 else up[idx - 13]
        assert lr_of[id(m.lora_down.weight)] == pytest.approx(want), name
        assert lr_of[id(m.lora_up.weight)] == pytest.approx(want), name
    # the input_blocks_0 weight belongs to conv_in, which has no LoRA (as in sd-scripts)
    assert {round(g["lr"], 4) for g in groups if g["name"] != "textencoder"} == set(down[1:]) | {0.33} | set(up)


def test_sdxl_mid_weight_covers_the_middle_block_and_presets_span_9(xl_targets):
    weights = LrWeights("linear", "0.1,0.2,0.3", "zeros+0.5").bind(blocks.SDXL)
    assert weights.down == pytest.approx([i / 8 for i in range(9)]) and weights.up == [0.5] * 9
    assert [weights.weight(f"lora_unet_middle_block_{i}_x") for i in range(3)] == [0.1, 0.2, 0.3]
    one = LrWeights(None, 0.0, None, zero_threshold=0.1).bind(blocks.SDXL)
    assert [one.weight(f"lora_unet_middle_block_{i}_x") for i in range(3)] == [0.0] * 3
    assert one.weight("lora_unet_input_blocks_4_1_proj_in") == 1.0 and one.weight("lora_te1_text_model_x") == 1.0


@pytest.mark.parametrize("key", ["down_lr_weight", "up_lr_weight"])
def test_sdxl_refuses_12_lr_weights(xl_targets, key):
    values = {"down_lr_weight": None, "up_lr_weight": None, key: csv([0.5] * 12)}
    with pytest.raises(UserError) as raised:
        LoRANetwork(xl_targets, dim=2, lr_weights=LrWeights(values["down_lr_weight"], None, values["up_lr_weight"]))
    side = "IN00-IN08" if key.startswith("down") else "OUT00-OUT08"
    assert str(raised.value) == (f"{key} needs 9 comma-separated values on SDXL ({side}) or one of "
                                 f"cosine, sine, linear, reverse_linear, zeros, got 12")


def test_text_encoder_only_sdxl_is_still_sdxl(xl_targets):
    te = [t for t in xl_targets if not t.name.startswith("lora_unet_")]
    assert LoRANetwork(te, dim=2, block_dims=csv([4] * 23)).layout is blocks.SDXL
    with pytest.raises(UserError, match="needs 23"):
        LoRANetwork(te, dim=2, block_dims=csv([4] * 25))


def test_sd_layout_is_unchanged(sd_targets):
    assert blocks.layout_of(t.name for t in sd_targets) is blocks.SD
    dims = [0] * 12 + [8] + [2] * 12
    net = LoRANetwork(sd_targets, dim=4, block_dims=csv(dims), lr_weights=LrWeights("0.5", None, "cosine"))
    assert all(not n.startswith("lora_unet_down_blocks") for n in net.lora_modules)
    assert net.lora_modules["lora_unet_mid_block_attentions_0_proj_in"].lora_dim == 8
    assert net.lr_weights.down == [0.5] + [1.0] * 11  # sd-scripts pads a short list with 1.0
    assert len(net.lr_weights.up) == 12 and net.lr_weights.mid is None
    with pytest.raises(UserError) as raised:
        LoRANetwork(sd_targets, dim=4, block_dims=csv([4] * 23))
    assert str(raised.value) == "block_dims needs 25 comma-separated values on SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), got 23"
