"""IA3 (lora_train/network/ia3.py) against LyCORIS 4.1.3's IA3Module, the oracle, and A1111 v1.10's
network_ia3.py, run with the few WebUI modules its network.py imports faked."""

import pytest
import torch
import torch.nn.functional as F

from lora_train.network.ia3 import IA3

from network_oracle import (KINDS, a1111_fixture, a1111_updown, make_input, merged_attention, output, randomise, twin_target,
                            with_module)

lycoris_ia3 = pytest.importorskip("lycoris.modules.ia3")

DIM, ALPHA = 4, 2.0  # irrelevant to IA3, passed as a network would


def _input(org):
    return make_input(org, 3, conv=(2, 7), seq=(5, 2), rows=(3, 5))


def _lyco(twin, **options):
    return lycoris_ia3.IA3Module("lyco", twin, 1.0, lora_dim=DIM, alpha=ALPHA, **options)


@pytest.mark.parametrize("on_input", [False, True], ids=["per-output", "on-input"])
@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_shapes_are_lycoris(kind, on_input):
    org, part, twin = twin_target(kind)
    ours = IA3("lora_unet_x", org, DIM, ALPHA, part=part, train_on_input=on_input)
    theirs = _lyco(twin, train_on_input=on_input).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours.state_dict()["on_input"].dtype == theirs["on_input"].dtype and int(ours.on_input) == int(on_input)
    assert set(ours.state_dict()) == set(IA3.suffixes)  # no alpha: LyCORIS writes none for IA3


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("on_input", [False, True], ids=["per-output", "on-input"])
@pytest.mark.parametrize("kind", KINDS)
def test_delta_and_output_match_lycoris(kind, on_input, multiplier):
    org, part, twin = twin_target(kind)
    lyco = _lyco(twin, train_on_input=on_input)
    randomise(lyco)
    ours = IA3("lora_unet_x", org, DIM, ALPHA, part=part, train_on_input=on_input)
    ours.load_state_dict(lyco.state_dict())
    ours.multiplier = lyco.multiplier = multiplier
    x = _input(org)
    with torch.no_grad():
        want = lyco.get_diff_weight(multiplier=multiplier)[0]
        assert torch.allclose(ours.delta(), want, atol=1e-6)
        assert torch.allclose(want, lyco.get_merged_weight(multiplier=multiplier)[0] - twin.weight, atol=1e-6)
        got = with_module(ours, org, x)
        if part is None:
            expected = lyco(x)
        else:  # the attention with the part's weight as LyCORIS merges it
            expected = merged_attention(org, part, lyco.get_merged_weight(multiplier=multiplier)[0], x)
        assert not torch.allclose(got, output(org, x), atol=1e-4)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_module_is_a_no_op_and_leaves_the_global_rng_alone(kind):
    org, part, _ = twin_target(kind)
    state = torch.random.get_rng_state()
    module = IA3("lora_unet_x", org, DIM, ALPHA, torch.Generator().manual_seed(0), part=part)
    IA3("lora_unet_y", org, DIM, ALPHA, part=part, train_on_input=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert module.scale == 1.0 and not module.delta().any()
    x = _input(org)
    with torch.no_grad():
        assert torch.allclose(with_module(module, org, x), output(org, x), atol=1e-6)  # the fused path rounds its own way


def test_unknown_options_and_dora_are_refused():
    org, _, _ = twin_target("linear")
    with pytest.raises(TypeError, match="use_tucker"):
        IA3("lora_unet_x", org, DIM, ALPHA, use_tucker=True)
    # LyCORIS takes weight_decompose for IA3 and ignores it: there is no IA3 DoRA to match
    with pytest.raises(TypeError, match="IA3 has no DoRA"):
        IA3("lora_unet_x", org, DIM, ALPHA).enable_dora()


@pytest.mark.parametrize("on_input", [False, True], ids=["per-output", "on-input"])
@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_a_lycoris_state_dict(kind, on_input):
    org, part, twin = twin_target(kind)
    lyco = _lyco(twin, train_on_input=on_input)
    randomise(lyco)
    weights = dict(lyco.state_dict())
    module = IA3.from_weights("lora_unet_x", org, weights, part=part)
    assert module.train_on_input is on_input
    module.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(module.delta(), lyco.get_diff_weight()[0], atol=1e-6)


def test_the_flag_is_read_back_from_a_file_on_a_square_target():
    """On a square Linear both axes have the same shape: only on_input tells them apart."""
    org, part, twin = twin_target("mha_q")
    lyco = _lyco(twin, train_on_input=True)
    randomise(lyco)
    module = IA3("lora_unet_x", org, DIM, ALPHA, part=part)  # per-output, then loaded from a per-input file
    module.load_state_dict(lyco.state_dict())
    assert module.train_on_input
    with torch.no_grad():
        assert torch.allclose(module.delta(), lyco.get_diff_weight()[0], atol=1e-6)


def test_from_weights_names_the_module_and_key_of_a_bad_file():
    org, _, twin = twin_target("linear")
    good = dict(_lyco(twin).state_dict())
    with pytest.raises(KeyError, match=r"lora_unet_x\.weight: shape \(8,\) does not fit a Linear 8->6"):
        IA3.from_weights("lora_unet_x", org, good | {"weight": torch.zeros(8)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.on_input: missing"):
        IA3.from_weights("lora_unet_x", org, {"weight": good["weight"]})
    with pytest.raises(KeyError, match=r"lora_unet_x\.weight: missing"):
        IA3.from_weights("lora_unet_x", org, {"on_input": good["on_input"]})
    conv, _, _ = twin_target("conv3x3")
    with pytest.raises(KeyError, match=r"lora_unet_c\.weight: shape \(6,\) does not fit a Conv2d 8->6 with a 3x3 kernel"):
        IA3.from_weights("lora_unet_c", conv, {"weight": torch.zeros(6), "on_input": torch.tensor(0)})


# -- A1111 v1.10's loader ------------------------------------------------------------------------------
a1111 = a1111_fixture("ia3")  # its network.py and network_ia3.py


# A1111 v1.10 cannot apply a per-output IA3 to a conv (its `w.reshape(-1, 1)` meets the kernel axes,
# not the output channels); LyCORIS writes such files, so that is A1111's gap, not a format difference
A1111_CASES = [(k, on) for k in KINDS for on in (False, True) if on or not k.startswith("conv")]


@pytest.mark.parametrize("kind,on_input", A1111_CASES, ids=[f"{k}-{'in' if on else 'out'}" for k, on in A1111_CASES])
def test_a1111_applies_the_same_change(a1111, kind, on_input):
    org, part, _ = twin_target(kind)
    module = IA3("lora_unet_x", org, DIM, ALPHA, part=part, train_on_input=on_input)
    randomise(module)
    module.multiplier = 0.7
    # as a file holds it: saved in half precision, the flag included
    file = {k: v.to(torch.float16) for k, v in module.state_dict().items()}
    module.load_state_dict(file)
    updown, ex_bias = a1111_updown(a1111, "Ia3", org, part, file, 0.7)
    assert ex_bias is None
    with torch.no_grad():
        assert torch.allclose(updown.float(), module.delta(), atol=1e-3)


def test_a1111_cannot_apply_a_per_output_conv_ia3(a1111):
    """Documents the gap the A1111 cases above leave out."""
    conv3x3, conv1x1 = twin_target("conv3x3")[0], twin_target("conv1x1")[0]
    with pytest.raises(RuntimeError):
        a1111_updown(a1111, "Ia3", conv3x3, None, IA3("lora_unet_x", conv3x3, DIM, ALPHA).state_dict(), 1.0)
    updown, _ = a1111_updown(a1111, "Ia3", conv1x1, None, IA3("lora_unet_x", conv1x1, DIM, ALPHA).state_dict(), 1.0)
    assert updown.shape == (6, 8, 6, 1)  # not the (6, 8, 1, 1) weight's shape


def test_per_output_forward_is_the_scaled_output():
    """IA3's meaning, independent of any implementation: (W + dW) x = (1 + m w) * W x per output channel."""
    org, _, _ = twin_target("conv3x3")
    module = IA3("lora_unet_x", org, DIM, ALPHA)
    randomise(module)
    module.multiplier = 0.5
    x = _input(org)
    with torch.no_grad():
        plain = F.conv2d(x, org.weight, None, 1, 1)
        want = plain * (1 + 0.5 * module.weight) + org.bias.view(1, -1, 1, 1)
        assert torch.allclose(with_module(module, org, x), want, atol=1e-5)
