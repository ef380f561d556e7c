"""IA3 (lora_train/network/ia3.py) against LyCORIS 4.1.3's IA3Module, the oracle, and A1111 v1.10's
network_ia3.py, run with the few WebUI modules its network.py imports faked."""

import os
import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_train.network import fused
from lora_train.network.ia3 import IA3

lycoris_ia3 = pytest.importorskip("lycoris.modules.ia3")

A1111 = Path(os.environ.get("LORA_TRAIN_WEBUI", "/work/a1111/webui")) / "extensions-builtin" / "Lora"  # a WebUI checkout, if any
KINDS = ("linear", "conv1x1", "conv3x3", "mha_q", "mha_k", "mha_v", "mha_out")
DIM, ALPHA = 4, 2.0  # irrelevant to IA3, passed as a network would


def _target(kind):
    """(our target, its part, the nn.Linear / Conv2d LyCORIS gets: a copy, or the part's weight slice)."""
    torch.manual_seed(0)
    if kind.startswith("mha_"):
        mha, part = nn.MultiheadAttention(8, 2), kind.removeprefix("mha_")
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
        twin = nn.Linear(8, 8)
        with torch.no_grad():
            twin.weight.copy_(fused.part_weight(mha, part))
        return mha, part, twin
    org = {"linear": lambda: nn.Linear(8, 6), "conv1x1": lambda: nn.Conv2d(8, 6, 1),
           "conv3x3": lambda: nn.Conv2d(8, 6, 3, stride=1, padding=1)}[kind]()
    return org, None, copy.deepcopy(org)


def _input(org):
    g = torch.Generator().manual_seed(3)
    if isinstance(org, nn.Conv2d):
        return torch.randn(2, 8, 7, 7, generator=g)
    if isinstance(org, nn.MultiheadAttention):
        return torch.randn(5, 2, 8, generator=g)
    return torch.randn(3, 5, 8, generator=g)


def _lyco(twin, **options):
    return lycoris_ia3.IA3Module("lyco", twin, 1.0, lora_dim=DIM, alpha=ALPHA, **options)


def _randomise(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _output(org, x):
    return org(x, x, x, need_weights=False)[0] if isinstance(org, nn.MultiheadAttention) else org(x)


def _with(module, org, x):
    module.attach(org)
    try:
        return _output(org, x)
    finally:
        module.detach()


def _merged_attention(mha, part, weight, x):
    merged = copy.deepcopy(mha)
    with torch.no_grad():
        fused.part_weight(merged, part).copy_(weight)
    return _output(merged, x)


@pytest.mark.parametrize("on_input", [False, True], ids=["per-output", "on-input"])
@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_shapes_are_lycoris(kind, on_input):
    org, part, twin = _target(kind)
    ours = IA3("lora_unet_x", org, DIM, ALPHA, part=part, train_on_input=on_input)
    theirs = _lyco(twin, train_on_input=on_input).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours.state_dict()["on_input"].dtype == theirs["on_input"].dtype and int(ours.on_input) == int(on_input)
    assert set(ours.state_dict()) == set(IA3.suffixes)  # no alpha: LyCORIS writes none for IA3


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("on_input", [False, True], ids=["per-output", "on-input"])
@pytest.mark.parametrize("kind", KINDS)
def test_delta_and_output_match_lycoris(kind, on_input, multiplier):
    org, part, twin = _target(kind)
    lyco = _lyco(twin, train_on_input=on_input)
    _randomise(lyco)
    ours = IA3("lora_unet_x", org, DIM, ALPHA, part=part, train_on_input=on_input)
    ours.load_state_dict(lyco.state_dict())
    ours.multiplier = lyco.multiplier = multiplier
    x = _input(org)
    with torch.no_grad():
        want = lyco.get_diff_weight(multiplier=multiplier)[0]
        assert torch.allclose(ours.delta(), want, atol=1e-6)
        assert torch.allclose(want, lyco.get_merged_weight(multiplier=multiplier)[0] - twin.weight, atol=1e-6)
        got = _with(ours, org, x)
        if part is None:
            expected = lyco(x)
        else:  # the attention with the part's weight as LyCORIS merges it
            expected = _merged_attention(org, part, lyco.get_merged_weight(multiplier=multiplier)[0], x)
        assert not torch.allclose(got, _output(org, x), atol=1e-4)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_module_is_a_no_op_and_leaves_the_global_rng_alone(kind):
    org, part, _ = _target(kind)
    state = torch.random.get_rng_state()
    module = IA3("lora_unet_x", org, DIM, ALPHA, torch.Generator().manual_seed(0), part=part)
    IA3("lora_unet_y", org, DIM, ALPHA, part=part, train_on_input=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert module.scale == 1.0 and not module.delta().any()
    x = _input(org)
    with torch.no_grad():
        assert torch.allclose(_with(module, org, x), _output(org, x), atol=1e-6)  # the fused path rounds its own way


def test_unknown_options_and_dora_are_refused():
    org, _, _ = _target("linear")
    with pytest.raises(TypeError, match="use_tucker"):
        IA3("lora_unet_x", org, DIM, ALPHA, use_tucker=True)
    # LyCORIS takes weight_decompose for IA3 and ignores it: there is no IA3 DoRA to match
    with pytest.raises(TypeError, match="IA3 has no DoRA"):
        IA3("lora_unet_x", org, DIM, ALPHA).enable_dora()


@pytest.mark.parametrize("on_input", [False, True], ids=["per-output", "on-input"])
@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_a_lycoris_state_dict(kind, on_input):
    org, part, twin = _target(kind)
    lyco = _lyco(twin, train_on_input=on_input)
    _randomise(lyco)
    weights = dict(lyco.state_dict())
    module = IA3.from_weights("lora_unet_x", org, weights, part=part)
    assert module.train_on_input is on_input
    module.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(module.delta(), lyco.get_diff_weight()[0], atol=1e-6)


def test_the_flag_is_read_back_from_a_file_on_a_square_target():
    """On a square Linear both axes have the same shape: only on_input tells them apart."""
    org, part, twin = _target("mha_q")
    lyco = _lyco(twin, train_on_input=True)
    _randomise(lyco)
    module = IA3("lora_unet_x", org, DIM, ALPHA, part=part)  # per-output, then loaded from a per-input file
    module.load_state_dict(lyco.state_dict())
    assert module.train_on_input
    with torch.no_grad():
        assert torch.allclose(module.delta(), lyco.get_diff_weight()[0], atol=1e-6)


def test_from_weights_names_the_module_and_key_of_a_bad_file():
    org, _, twin = _target("linear")
    good = dict(_lyco(twin).state_dict())
    with pytest.raises(KeyError, match=r"lora_unet_x\.weight: shape \(8,\) does not fit a Linear 8->6"):
        IA3.from_weights("lora_unet_x", org, good | {"weight": torch.zeros(8)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.on_input: missing"):
        IA3.from_weights("lora_unet_x", org, {"weight": good["weight"]})
    with pytest.raises(KeyError, match=r"lora_unet_x\.weight: missing"):
        IA3.from_weights("lora_unet_x", org, {"on_input": good["on_input"]})
    conv, _, _ = _target("conv3x3")
    with pytest.raises(KeyError, match=r"lora_unet_c\.weight: shape \(6,\) does not fit a Conv2d 8->6 with a 3x3 kernel"):
        IA3.from_weights("lora_unet_c", conv, {"weight": torch.zeros(6), "on_input": torch.tensor(0)})


# -- A1111 v1.10's loader ------------------------------------------------------------------------------
@pytest.fixture
def a1111(monkeypatch):
    """A1111's own network.py and network_ia3.py; the WebUI modules network.py imports are empty fakes
    (nothing IA3's math reads comes from them), removed again after the test."""
    if not (A1111 / "network_ia3.py").is_file():
        pytest.skip("A1111 WebUI not found")
    fakes = {name: types.ModuleType(name) for name in (
        "modules", "modules.sd_models", "modules.cache", "modules.errors", "modules.hashes", "modules.shared",
        "modules.models", "modules.models.sd3", "modules.models.sd3.mmdit")}
    fakes["modules.models.sd3.mmdit"].QkvLinear = type("QkvLinear", (nn.Linear,), {})
    for name, mod in fakes.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(fakes[parent], child, mod)
        monkeypatch.setitem(sys.modules, name, mod)
    loaded = []
    for name in ("network", "network_ia3"):
        spec = importlib.util.spec_from_file_location(name, A1111 / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        loaded.append(mod)
    return loaded


def _a1111_updown(a1111, org, part, file, multiplier):
    network, network_ia3 = a1111
    net = network.Network("test", None)
    net.unet_multiplier = multiplier
    weights = network.NetworkWeights(network_key="lora_unet_x", sd_key="unet_x", w=file, sd_module=org)
    module = network_ia3.ModuleTypeIa3().create_module(net, weights)
    assert isinstance(module, network_ia3.NetworkModuleIa3)
    weight = fused.part_weight(org, part) if part else org.weight
    return module.calc_updown(weight.detach())


# A1111 v1.10 cannot apply a per-output IA3 to a conv (its `w.reshape(-1, 1)` meets the kernel axes,
# not the output channels); LyCORIS writes such files, so that is A1111's gap, not a format difference
A1111_CASES = [(k, on) for k in KINDS for on in (False, True) if on or not k.startswith("conv")]


@pytest.mark.parametrize("kind,on_input", A1111_CASES, ids=[f"{k}-{'in' if on else 'out'}" for k, on in A1111_CASES])
def test_a1111_applies_the_same_change(a1111, kind, on_input):
    org, part, _ = _target(kind)
    module = IA3("lora_unet_x", org, DIM, ALPHA, part=part, train_on_input=on_input)
    _randomise(module)
    module.multiplier = 0.7
    # as a file holds it: saved in half precision, the flag included
    file = {k: v.to(torch.float16) for k, v in module.state_dict().items()}
    module.load_state_dict(file)
    updown, ex_bias = _a1111_updown(a1111, org, part, file, 0.7)
    assert ex_bias is None
    with torch.no_grad():
        assert torch.allclose(updown.float(), module.delta(), atol=1e-3)


def test_a1111_cannot_apply_a_per_output_conv_ia3(a1111):
    """Documents the gap the A1111 cases above leave out."""
    conv3x3, conv1x1 = _target("conv3x3")[0], _target("conv1x1")[0]
    with pytest.raises(RuntimeError):
        _a1111_updown(a1111, conv3x3, None, IA3("lora_unet_x", conv3x3, DIM, ALPHA).state_dict(), 1.0)
    updown, _ = _a1111_updown(a1111, conv1x1, None, IA3("lora_unet_x", conv1x1, DIM, ALPHA).state_dict(), 1.0)
    assert updown.shape == (6, 8, 6, 1)  # not the (6, 8, 1, 1) weight's shape


def test_per_output_forward_is_the_scaled_output():
    """IA3's meaning, independent of any implementation: (W + dW) x = (1 + m w) * W x per output channel."""
    org, _, _ = _target("conv3x3")
    module = IA3("lora_unet_x", org, DIM, ALPHA)
    _randomise(module)
    module.multiplier = 0.5
    x = _input(org)
    with torch.no_grad():
        plain = F.conv2d(x, org.weight, None, 1, 1)
        want = plain * (1 + 0.5 * module.weight) + org.bias.view(1, -1, 1, 1)
        assert torch.allclose(_with(module, org, x), want, atol=1e-5)
