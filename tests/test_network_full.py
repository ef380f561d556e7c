"""Full (lora_train/network/full.py) against LyCORIS 4.1.3's FullModule, the oracle, and A1111 v1.10's
network_full.py, run with the few WebUI modules its network.py imports faked."""

import pytest
import torch
import torch.nn.functional as F

from lora_train.network.full import Full

from network_oracle import a1111_fixture, a1111_updown, make_input, merged_attention, output, randomise, twin_target, with_module

lycoris_full = pytest.importorskip("lycoris.modules.full")

KINDS = ("linear", "linear_nobias", "conv1x1", "conv3x3", "mha_q", "mha_k", "mha_v", "mha_out", "mha_nobias_v")
DIM, ALPHA = 4, 2.0  # irrelevant to full, passed as a network would


def _input(org):
    return make_input(org, 3, conv=(2, 7), seq=(5, 2), rows=(3, 5))


def _lyco(twin, **options):
    return lycoris_full.FullModule("lyco", twin, 1.0, lora_dim=DIM, alpha=ALPHA, **options)


def _randomised_lyco(twin, seed=1):
    return randomise(_lyco(twin), seed)  # before apply_to, LyCORIS' parameters ARE the diffs


def _file(lyco):
    """LyCORIS' file tensors. Its state_dict() is only right after apply_to() (before, it subtracts the
    weight from a parameter that does not hold it yet), so the diffs are read from get_diff_weight."""
    diff, diff_b = lyco.get_diff_weight(multiplier=1.0)
    return {"diff": diff.detach().clone()} | ({} if diff_b is None else {"diff_b": diff_b.detach().clone()})


@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_shapes_are_lycoris(kind):
    org, part, twin = twin_target(kind)
    ours = Full("lora_unet_x", org, DIM, ALPHA, part=part).state_dict()
    theirs = _lyco(twin).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ("diff_b" in ours) == (twin.bias is not None)  # no alpha: dim and alpha mean nothing to full


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_delta_bias_and_output_match_lycoris(kind, multiplier):
    org, part, twin = twin_target(kind)
    lyco = _randomised_lyco(twin)
    ours = Full("lora_unet_x", org, DIM, ALPHA, part=part)
    ours.load_state_dict(_file(lyco))
    ours.multiplier = lyco.multiplier = multiplier
    x = _input(org)
    with torch.no_grad():
        diff, diff_b = lyco.get_diff_weight(multiplier=multiplier)
        merged, merged_b = lyco.get_merged_weight(multiplier=multiplier)
        assert torch.allclose(ours.delta(), diff, atol=1e-6)
        assert torch.allclose(ours.delta(), merged - twin.weight, atol=1e-6)
        if twin.bias is None:
            assert ours.bias_delta() is None and diff_b is None
        else:
            assert torch.allclose(ours.bias_delta(), diff_b, atol=1e-6)
            assert torch.allclose(ours.bias_delta(), merged_b - twin.bias, atol=1e-6)
        got = with_module(ours, org, x)
        expected = lyco(x) if part is None else merged_attention(org, part, merged, x, merged_b)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_module_is_a_no_op_and_leaves_the_global_rng_alone(kind):
    org, part, _ = twin_target(kind)
    state = torch.random.get_rng_state()
    module = Full("lora_unet_x", org, DIM, ALPHA, torch.Generator().manual_seed(0), part=part)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert module.scale == 1.0 and not module.delta().any()
    assert module.bias_delta() is None or not module.bias_delta().any()
    x = _input(org)
    with torch.no_grad():
        assert torch.allclose(with_module(module, org, x), output(org, x), atol=1e-6)  # the fused path rounds its own way


def test_unknown_options_and_dora_are_refused():
    org, _, _ = twin_target("linear")
    with pytest.raises(TypeError, match="use_tucker"):
        Full("lora_unet_x", org, DIM, ALPHA, use_tucker=True)
    with pytest.raises(TypeError, match="Full has no DoRA"):
        Full("lora_unet_x", org, DIM, ALPHA).enable_dora()


def test_rank_dropout_drops_whole_output_units_as_lycoris():
    """LyCORIS' full: in training, a mask over output units multiplies the weight's rows and the bias,
    not rescaled. Every output channel then changes fully or not at all."""
    org, _, twin = twin_target("conv3x3")
    module = Full("lora_unet_x", org, DIM, ALPHA)
    module.load_state_dict(_file(_randomised_lyco(twin)))
    module.rank_dropout, module.dropout_generator = 0.5, torch.Generator().manual_seed(5)
    module.train()
    x = _input(org)
    with torch.no_grad():
        change = with_module(module, org, x) - output(org, x)
        full_change = F.conv2d(x, module.diff, module.diff_b, 1, 1)
    kept = [torch.allclose(change[:, c], full_change[:, c], atol=1e-5) for c in range(6)]
    dropped = [bool((change[:, c].abs() < 1e-6).all()) for c in range(6)]
    assert all(k != d for k, d in zip(kept, dropped)) and any(kept) and any(dropped), (kept, dropped)


@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_a_lycoris_state_dict(kind):
    org, part, twin = twin_target(kind)
    lyco = _randomised_lyco(twin)
    lyco.apply_to()  # what LyCORIS' network does before saving; its state_dict is right from here on
    try:
        weights = dict(lyco.state_dict())
    finally:
        lyco.restore()
    module = Full.from_weights("lora_unet_x", org, weights, part=part)
    module.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(module.delta(), _file(lyco)["diff"], atol=1e-5)
        if "diff_b" in weights:
            assert torch.allclose(module.bias_delta(), _file(lyco)["diff_b"], atol=1e-5)


def test_from_weights_names_the_module_and_key_of_a_bad_file():
    org, _, _ = twin_target("linear")
    with pytest.raises(KeyError, match=r"lora_unet_x\.diff: shape \(6, 9\) does not fit a Linear 8->6"):
        Full.from_weights("lora_unet_x", org, {"diff": torch.zeros(6, 9)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.diff_b: shape \(8,\) does not fit a Linear 8->6"):
        Full.from_weights("lora_unet_x", org, {"diff": torch.zeros(6, 8), "diff_b": torch.zeros(8)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.diff: missing"):
        Full.from_weights("lora_unet_x", org, {"diff_b": torch.zeros(6)})
    bare, _, _ = twin_target("linear_nobias")
    with pytest.raises(KeyError, match=r"lora_unet_x\.diff_b: a Linear 8->6 here has no bias"):
        Full.from_weights("lora_unet_x", bare, {"diff": torch.zeros(6, 8), "diff_b": torch.zeros(6)})
    conv, _, _ = twin_target("conv3x3")
    with pytest.raises(KeyError, match=r"lora_unet_c\.diff: shape \(6, 8, 1, 1\) does not fit a Conv2d 8->6 with a 3x3 kernel"):
        Full.from_weights("lora_unet_c", conv, {"diff": torch.zeros(6, 8, 1, 1)})


# -- A1111 v1.10's loader ------------------------------------------------------------------------------
a1111 = a1111_fixture("full")  # its network.py and network_full.py


@pytest.mark.parametrize("kind", KINDS)
def test_a1111_applies_the_same_change(a1111, kind):
    org, part, _ = twin_target(kind)
    module = randomise(Full("lora_unet_x", org, DIM, ALPHA, part=part), seed=7, scale=1.0)
    module.multiplier = 0.7
    updown, ex_bias = a1111_updown(a1111, "Full", org, part, module.state_dict(), 0.7)
    with torch.no_grad():
        assert torch.allclose(updown, module.delta(), atol=1e-6)
        if module.diff_b is None:
            assert ex_bias is None
        else:
            assert torch.allclose(ex_bias, module.bias_delta(), atol=1e-6)
