"""Norm (lora_train/network/norm.py) against LyCORIS 4.1.3's NormModule (train_norm=True), the oracle,
LyCORIS' kohya wrapper for which norm layers it trains, and A1111 v1.10's network_norm.py, run with the
few WebUI modules its network.py imports faked."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_train.network.norm import Norm, ldm_unet_norm_targets
from lora_train.network.targets import preset_targets

from network_oracle import a1111_fixture, a1111_module, randomise, with_module

lycoris_norms = pytest.importorskip("lycoris.modules.norms")

KINDS = ("layernorm", "groupnorm")
DIM, ALPHA = 4, 2.0  # irrelevant to norms, passed as a network would


def _target(kind):
    """(our target, the copy LyCORIS gets), with a non-trivial weight and bias so merging is tested."""
    org = nn.LayerNorm(8) if kind == "layernorm" else nn.GroupNorm(2, 8, eps=1e-6)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        org.weight.copy_(1 + 0.3 * torch.randn(8, generator=g))
        org.bias.copy_(0.3 * torch.randn(8, generator=g))
    return org, copy.deepcopy(org)


def _input(org):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 8, 4, 4, generator=g) if isinstance(org, nn.GroupNorm) else torch.randn(3, 5, 8, generator=g)


def _norm_with(org, weight, bias, x):
    """The target with another weight and bias, from torch alone."""
    if isinstance(org, nn.GroupNorm):
        return F.group_norm(x, org.num_groups, weight, bias, org.eps)
    return F.layer_norm(x, org.normalized_shape, weight, bias, org.eps)


def _lyco(twin):
    return lycoris_norms.NormModule("lyco", twin, 1.0)


def _randomised_lyco(twin, seed=1):
    return randomise(_lyco(twin), seed)


@pytest.mark.parametrize("org", [nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.LayerNorm(8, bias=False)], ids=["ln", "gn", "ln_nobias"])
def test_keys_and_shapes_are_lycoris(org):
    ours = Norm("lora_unet_x", org, DIM, ALPHA).state_dict()
    theirs = _lyco(copy.deepcopy(org)).state_dict()
    # both keys even for a norm without a bias (LyCORIS tests hasattr(org, "bias")); no alpha
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()} == {"w_norm": (8,), "b_norm": (8,)}


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_delta_bias_and_output_match_lycoris(kind, multiplier):
    org, twin = _target(kind)
    lyco = _randomised_lyco(twin)
    ours = Norm("lora_unet_x", org, DIM, ALPHA)
    ours.load_state_dict(lyco.state_dict())
    ours.multiplier = lyco.multiplier = multiplier
    x = _input(org)
    with torch.no_grad():
        diff_w, diff_b = lyco.get_diff_weight(multiplier=multiplier)
        merged_w, merged_b = lyco.get_merged_weight(multiplier=multiplier)
        assert torch.allclose(ours.delta(), diff_w, atol=1e-6)
        assert torch.allclose(ours.bias_delta(), diff_b, atol=1e-6)
        assert torch.allclose(ours.delta(), merged_w - twin.weight, atol=1e-6)
        assert torch.allclose(ours.bias_delta(), merged_b - twin.bias, atol=1e-6)
        got = with_module(ours, org, x)
        assert torch.allclose(got, lyco(x), atol=1e-5), (got - lyco(x)).abs().max()
        # and exactly the norm with the changed weight and bias
        assert torch.allclose(got, _norm_with(org, merged_w, merged_b, x), atol=1e-5)


def test_a_norm_without_bias_gains_one():
    """LyCORIS writes b_norm for a LayerNorm(bias=False) but cannot run it; A1111 adds the bias. Ours does as A1111."""
    org = nn.LayerNorm(8, bias=False)
    module = Norm("lora_unet_x", org, DIM, ALPHA)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        module.w_norm.copy_(torch.randn(8, generator=g))
        module.b_norm.copy_(torch.randn(8, generator=g))
        x = _input(org)
        want = _norm_with(org, org.weight + module.w_norm, module.b_norm, x)
        assert torch.allclose(with_module(module, org, x), want, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_module_is_a_no_op_and_leaves_the_global_rng_alone(kind):
    org, _ = _target(kind)
    state = torch.random.get_rng_state()
    module = Norm("lora_unet_x", org, DIM, ALPHA, torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert module.scale == 1.0 and not module.delta().any() and not module.bias_delta().any()
    x = _input(org)
    with torch.no_grad():
        assert torch.equal(with_module(module, org, x), org(x))


def test_targets_options_and_dora():
    assert Norm.accepts(nn.LayerNorm(8)) and Norm.accepts(nn.GroupNorm(2, 8))
    assert Norm.accepts(type("GroupNorm32", (nn.GroupNorm,), {})(2, 8))  # ldm's ResBlock norms
    for org in (nn.Linear(8, 6), nn.Conv2d(8, 6, 1), nn.LayerNorm(8, elementwise_affine=False), nn.GroupNorm(2, 8, affine=False),
                nn.LayerNorm((4, 8))):
        assert not Norm.accepts(org)
    assert not Norm.accepts(nn.LayerNorm(8), part="q")
    with pytest.raises(TypeError, match="Norm does not train a Linear"):
        Norm("lora_unet_x", nn.Linear(8, 6), DIM, ALPHA)
    with pytest.raises(TypeError, match="use_tucker"):
        Norm("lora_unet_x", nn.LayerNorm(8), DIM, ALPHA, use_tucker=True)
    with pytest.raises(TypeError, match="Norm has no DoRA"):
        Norm("lora_unet_x", nn.LayerNorm(8), DIM, ALPHA).enable_dora()
    assert Norm.claims({"w_norm", "b_norm"}) and Norm.claims({"w_norm"}) and not Norm.claims({"b_norm"})


@pytest.mark.parametrize("kind", KINDS)
def test_rank_dropout_drops_whole_channels(kind):
    """In training a mask over channels multiplies w_norm and b_norm, not rescaled: each channel changes
    fully or not at all. A fraction rank_dropout is dropped (LyCORIS' NormModule keeps that fraction)."""
    org = nn.LayerNorm(64) if kind == "layernorm" else nn.GroupNorm(4, 64)
    module = Norm("lora_unet_x", org, DIM, ALPHA)
    with torch.no_grad():
        module.w_norm.fill_(0.5)
        module.b_norm.fill_(0.25)
    module.rank_dropout, module.dropout_generator = 0.75, torch.Generator().manual_seed(5)
    module.train()
    x = torch.randn(2, 3, 64) if kind == "layernorm" else torch.randn(2, 64, 3, 3)
    with torch.no_grad():
        change = with_module(module, org, x) - org(x)
        full = _norm_with(org, module.w_norm, module.b_norm, x)
    axis = -1 if kind == "layernorm" else 1
    change, full = change.movedim(axis, 0).reshape(64, -1), full.movedim(axis, 0).reshape(64, -1)
    kept = torch.isclose(change, full, atol=1e-5).all(1)
    dropped = (change.abs() < 1e-6).all(1)
    assert bool((kept ^ dropped).all())
    assert 4 <= int(kept.sum()) <= 28, int(kept.sum())  # about a quarter of 64 kept
    state = torch.random.get_rng_state()
    with torch.no_grad():
        with_module(module, org, x)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_a_lycoris_state_dict(kind):
    org, twin = _target(kind)
    lyco = _randomised_lyco(twin)
    weights = dict(lyco.state_dict())
    module = Norm.from_weights("lora_unet_x", org, weights)
    module.load_state_dict(weights)
    with torch.no_grad():
        assert torch.equal(module.delta(), lyco.w_norm) and torch.equal(module.bias_delta(), lyco.b_norm)
    # LyCORIS' own loader needs only w_norm
    alone = Norm.from_weights("lora_unet_x", org, {"w_norm": weights["w_norm"]})
    assert {k: tuple(v.shape) for k, v in alone.state_dict().items()} == {"w_norm": (8,), "b_norm": (8,)}


def test_from_weights_names_the_module_and_key_of_a_bad_file():
    with pytest.raises(KeyError, match=r"lora_unet_x\.w_norm: shape \(6,\) does not fit a LayerNorm of 8 channels \(its weight is \(8,\)\)"):
        Norm.from_weights("lora_unet_x", nn.LayerNorm(8), {"w_norm": torch.zeros(6), "b_norm": torch.zeros(8)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.b_norm: shape \(8, 1\) does not fit a GroupNorm of 8 channels in 2 groups \(its bias is \(8,\)\)"):
        Norm.from_weights("lora_unet_x", nn.GroupNorm(2, 8), {"w_norm": torch.zeros(8), "b_norm": torch.zeros(8, 1)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.w_norm: missing"):
        Norm.from_weights("lora_unet_x", nn.LayerNorm(8), {"b_norm": torch.zeros(8)})


# -- which norm layers LyCORIS' kohya wrapper trains with train_norm ---------------------------------
# The same tiny UNet twice: in sd-scripts' diffusers layout (the class names LyCORIS matches) and in the
# host's ldm layout (what ldm_unet_norm_targets reads), each with one ResBlock and one transformer,
# plus a norm outside any block; and a CLIP encoder layer whose norms sit beside its attention and MLP.
def _classes(*names):
    return {n: type(n, (nn.Module,), {}) for n in names}


D = _classes("Transformer2DModel", "ResnetBlock2D", "CrossAttnDownBlock2D", "UNet2DConditionModel",
             "CLIPAttention", "CLIPMLP", "CLIPEncoderLayer", "CLIPTextTransformer")
L = _classes("SpatialTransformer", "ResBlock", "UNetModel")
BASIC_BLOCK = type("BasicTransformerBlock", (nn.Module,), {})  # the same class in both layouts


def _make(cls, **children):
    module = cls()
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _transformer_children(c):
    block = _make(BASIC_BLOCK, norm1=nn.LayerNorm(c), attn1=nn.Linear(c, c),
                  norm2=nn.LayerNorm(c), norm3=nn.LayerNorm(c))
    return {"norm": nn.GroupNorm(2, c, eps=1e-6), "proj_in": nn.Conv2d(c, c, 1), "transformer_blocks": nn.ModuleList([block])}


def _diffusers_unet(c=8):
    resnet = _make(D["ResnetBlock2D"], norm1=nn.GroupNorm(2, c), conv1=nn.Conv2d(c, c, 3), norm2=nn.GroupNorm(2, c), conv2=nn.Conv2d(c, c, 3))
    down = _make(D["CrossAttnDownBlock2D"], resnets=nn.ModuleList([resnet]), attentions=nn.ModuleList([_make(D["Transformer2DModel"], **_transformer_children(c))]))
    return _make(D["UNet2DConditionModel"], conv_in=nn.Conv2d(4, c, 3), down_blocks=nn.ModuleList([down]), conv_norm_out=nn.GroupNorm(2, c),
                 conv_out=nn.Conv2d(c, 4, 3))


def _ldm_unet(c=8):
    res = _make(L["ResBlock"], in_layers=nn.Sequential(nn.GroupNorm(2, c), nn.SiLU(), nn.Conv2d(c, c, 3)),
                out_layers=nn.Sequential(nn.GroupNorm(2, c), nn.SiLU(), nn.Dropout(), nn.Conv2d(c, c, 3)))
    first = nn.ModuleList([nn.Conv2d(4, c, 3)])
    return _make(L["UNetModel"], input_blocks=nn.ModuleList([first, nn.ModuleList([res, _make(L["SpatialTransformer"], **_transformer_children(c))])]),
                 out=nn.Sequential(nn.GroupNorm(2, c), nn.SiLU(), nn.Conv2d(c, 4, 3)))


def _clip_text(c=8):
    layer = _make(D["CLIPEncoderLayer"], self_attn=_make(D["CLIPAttention"], q_proj=nn.Linear(c, c)), layer_norm1=nn.LayerNorm(c),
                  mlp=_make(D["CLIPMLP"], fc1=nn.Linear(c, c)), layer_norm2=nn.LayerNorm(c))
    return _make(D["CLIPTextTransformer"], encoder=_make(nn.Module, layers=nn.ModuleList([layer])), final_layer_norm=nn.LayerNorm(c))


@pytest.mark.parametrize("preset", ["full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only", "ia3"])
def test_norm_targets_are_those_lycoris_trains(preset, monkeypatch):
    kohya = pytest.importorskip("lycoris.kohya")
    from lycoris.config import PRESET

    net_class = kohya.LycorisNetworkKohya
    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                 "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(net_class, attr, getattr(net_class, attr))  # apply_preset sets class attributes: put them back after
    net_class.apply_preset(PRESET[preset])
    net = net_class(_clip_text(), _diffusers_unet(), lora_dim=4, conv_lora_dim=4, alpha=1, conv_alpha=1, network_module="lora",
                    train_norm=True, warn_on_unmatched=False)
    theirs = sorted(m.lora_name for m in net.text_encoder_loras + net.unet_loras if isinstance(m, lycoris_norms.NormModule))
    ours = sorted(t.name for t in preset_targets(ldm_unet_norm_targets(_ldm_unet()), preset))
    assert ours == theirs
    if preset == "full":  # every norm inside a ResBlock or transformer; none in the text encoder, none outside the blocks
        assert ours == ["lora_unet_down_blocks_0_attentions_0_norm"] + [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm{i}" for i in (1, 2, 3)] \
            + ["lora_unet_down_blocks_0_resnets_0_norm1", "lora_unet_down_blocks_0_resnets_0_norm2"]


# -- A1111 v1.10's loader ------------------------------------------------------------------------------
a1111 = a1111_fixture("norm")  # its network.py and network_norm.py


@pytest.mark.parametrize("kind", KINDS)
def test_a1111_applies_the_same_change(a1111, kind):
    network_norm = a1111[1]
    org, _ = _target(kind)
    module = randomise(Norm("lora_unet_x", org, DIM, ALPHA), seed=7, scale=1.0)
    module.multiplier = 0.7
    file = module.state_dict()
    loaded = a1111_module(a1111, "Norm", org, file, 0.7)
    assert isinstance(loaded, network_norm.NetworkModuleNorm)
    x = _input(org)
    with torch.no_grad():
        updown, ex_bias = loaded.calc_updown(org.weight.detach())
        assert torch.allclose(updown, module.delta(), atol=1e-6)
        assert torch.allclose(ex_bias, module.bias_delta(), atol=1e-6)
        # what A1111 renders: the norm with weight + updown and bias + ex_bias (its weight patching), or
        # the norm's output plus the norm op with (updown, ex_bias) (its forward mode)
        patched = _norm_with(org, org.weight + updown, org.bias + ex_bias, x)
        assert torch.allclose(with_module(module, org, x), patched, atol=1e-5)
        assert torch.allclose(loaded.forward(x, org(x)), patched, atol=1e-5)
    # A1111 builds a norm module only when both keys are there
    assert a1111_module(a1111, "Norm", org, {"w_norm": file["w_norm"]}, 0.7) is None
