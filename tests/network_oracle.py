"""What the tests of an algorithm against its oracles (tests/test_network_<algorithm>.py: LyCORIS 4.1.3's
module, A1111's loader) share: the targets and the LyCORIS "twin" of an attention part, seeded inputs and
parameters, and A1111's own code, loaded from a WebUI checkout.

Every builder draws from fixed seeds in a fixed order, so a test sees the same tensors on every run; what
differs between the test files (a seed, a scale, a shape, the A1111 module to load) is a parameter."""

import copy
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_train.network import fused
from lora_train.network.full import target_bias

# a WebUI checkout, if any
A1111_LORA = Path(os.environ.get("LORA_TRAIN_WEBUI", "/work/a1111/webui")) / "extensions-builtin" / "Lora"

# the plain targets, built when called, from the global RNG (the caller seeds it)
LAYERS = {
    "linear": lambda: nn.Linear(8, 6),
    "conv1x1": lambda: nn.Conv2d(8, 6, 1),
    "conv3x3": lambda: nn.Conv2d(8, 6, 3, stride=1, padding=1),
}
KINDS = (*LAYERS, *(f"mha_{p}" for p in fused.PARTS))  # and each part of a MultiheadAttention(8, 2)


# -- targets -----------------------------------------------------------------------------------------
def layers():
    """{kind: (target, None)} for every kind in LAYERS, built in that order."""
    return {kind: (make(), None) for kind, make in LAYERS.items()}


def targets(extra=None):
    """{kind: (target, part)} for every kind in KINDS, the parts those of one attention, then what extra()
    builds, all drawn after torch.manual_seed(0)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    return layers() | {f"mha_{p}": (mha, p) for p in fused.PARTS} | (extra() if extra else {})


def lyco_target(org, part, bias=True, copy_org=False):
    """What a LyCORIS module wraps: the target itself (a copy with copy_org), or for an attention part its
    twin, a Linear (of the attention's dtype) holding that part's weight slice and, with bias, its bias slice."""
    if part is None:
        return copy.deepcopy(org) if copy_org else org
    lin = nn.Linear(org.embed_dim, org.embed_dim, bias=bias).to(org.in_proj_weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(fused.part_weight(org, part))
        if bias:
            lin.bias.copy_(target_bias(org, part))
    return lin


def twin_target(kind):
    """(target, part, twin) drawn after torch.manual_seed(0): the target of a kind in KINDS, "linear_nobias"
    or "mha_nobias_<part>" (an attention without biases), built alone, an attention with its biases drawn
    so that they show; the twin is what LyCORIS gets, a copy of the target or lyco_target's Linear."""
    torch.manual_seed(0)
    if kind.startswith("mha_"):
        part = kind.rpartition("_")[2]
        mha = nn.MultiheadAttention(8, 2, bias="nobias" not in kind)
        if mha.in_proj_bias is not None:
            with torch.no_grad():
                mha.in_proj_bias.normal_()
                mha.out_proj.bias.normal_()
        return mha, part, lyco_target(mha, part, bias=target_bias(mha, part) is not None)
    org = (LAYERS | {"linear_nobias": lambda: nn.Linear(8, 6, bias=False)})[kind]()
    return org, None, copy.deepcopy(org)


# -- inputs, parameters, outputs -----------------------------------------------------------------------
def make_input(org, seed, conv, seq, rows, dtype=None):
    """A seeded input for org: for a Conv2d (N, C, H, H) with conv = (N, H); for an attention (L, N, E)
    with seq = (L, N); for a Linear rows + (in,)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(org, nn.Conv2d):
        n, size = conv
        return torch.randn(n, org.in_channels, size, size, generator=g, dtype=dtype)
    if isinstance(org, nn.MultiheadAttention):
        return torch.randn(*seq, org.embed_dim, generator=g, dtype=dtype)
    return torch.randn(*rows, org.in_features, generator=g, dtype=dtype)


def randomise(module, seed=1, scale=0.5, magnitudes=(), offsets=None):
    """Fills the module's parameters, in order, with scale * N(0, 1) from a generator seeded with seed
    (in each parameter's dtype). Those named in magnitudes (DoRA's scale, a scalar) become |r| + 0.5, kept
    positive; those named in offsets get that offset added. Returns the module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale
            if name in magnitudes:
                r = r.abs() + 0.5
            elif offsets and name in offsets:
                r = r + offsets[name]
            p.copy_(r)
    return module


def output(org, x):
    """The target's output for x (an attention's with x as query, key and value)."""
    return org(x, x, x, need_weights=False)[0] if isinstance(org, nn.MultiheadAttention) else org(x)


def with_module(module, org, x):
    """The target's output with the module attached, detached again after."""
    module.attach(org)
    try:
        return output(org, x)
    finally:
        module.detach()


def merged_attention(mha, part, weight, x, bias=None):
    """The output of a copy of the attention whose part has this weight (and this bias, if given)."""
    merged = copy.deepcopy(mha)
    with torch.no_grad():
        fused.part_weight(merged, part).copy_(weight)
        if bias is not None:
            target_bias(merged, part).copy_(bias)
    return output(merged, x)


# -- A1111 -----------------------------------------------------------------------------------------------
# its lyco_helpers.py is torch only, imported as it is; its network_<x>.py imports its network.py, which
# imports the WebUI's modules.*: those are faked (a1111_fixture)
needs_lyco_helpers = pytest.mark.skipif(not (A1111_LORA / "lyco_helpers.py").is_file(), reason="A1111 WebUI not present")


def lyco_helpers():
    """A1111's lyco_helpers.py, from the WebUI checkout."""
    spec = importlib.util.spec_from_file_location("a1111_lyco_helpers", A1111_LORA / "lyco_helpers.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


def a1111_fixture(algorithm):
    """A fixture `a1111`: [network, network_<algorithm>], A1111's own network.py and network_<algorithm>.py;
    the WebUI modules network.py imports are empty fakes (nothing the algorithm's math reads comes from
    them), removed again after the test. Skips the test without a WebUI checkout."""

    @pytest.fixture(name="a1111")
    def fixture(monkeypatch):
        if not (A1111_LORA / f"network_{algorithm}.py").is_file():
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
        for name in ("network", f"network_{algorithm}"):
            spec = importlib.util.spec_from_file_location(name, A1111_LORA / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            monkeypatch.setitem(sys.modules, name, mod)
            spec.loader.exec_module(mod)
            loaded.append(mod)
        return loaded

    return fixture


def a1111_module(a1111, name, org, file, multiplier):
    """What A1111's ModuleType<name> (ModuleTypeIa3, ...) builds from the file for org, in a network at unet
    multiplier `multiplier`, as its loader does: a NetworkModule<name>, or None for a file it does not take."""
    network, algorithm = a1111
    net = network.Network("test", None)
    net.unet_multiplier = multiplier
    weights = network.NetworkWeights(network_key="lora_unet_x", sd_key="unet_x", w=file, sd_module=org)
    return getattr(algorithm, f"ModuleType{name}")().create_module(net, weights)


def a1111_updown(a1111, name, org, part, file, multiplier):
    """(updown, ex_bias): A1111's NetworkModule<name> for the file, applied to the target's weight or its
    attention part's."""
    module = a1111_module(a1111, name, org, file, multiplier)
    assert isinstance(module, getattr(a1111[1], f"NetworkModule{name}"))
    weight = fused.part_weight(org, part) if part else org.weight
    return module.calc_updown(weight.detach())


def dora_as_loaders_apply(theirs):
    """LyCORIS' DoRA module with the multiplier as A1111 and ComfyUI apply a file: the whole change
    times m (LyCORIS blends only the magnitude, which at m = 0 still adds all of the delta; the two
    agree at m = 1). `theirs.multiplier` keeps its meaning; forward and get_merged_weight follow it."""
    forward, merged_weight = theirs.forward, theirs.get_merged_weight

    def at_one(fn, *args, **kwargs):
        m, theirs.multiplier = theirs.multiplier, 1.0
        try:
            return fn(*args, **kwargs), m
        finally:
            theirs.multiplier = m

    def scaled_forward(x, *args, **kwargs):
        full, m = at_one(forward, x, *args, **kwargs)
        base = theirs.org_forward(x, *args, **kwargs)
        return base + m * (full - base)

    def scaled_merged_weight(multiplier=1.0, **kwargs):
        full = merged_weight(multiplier=1.0, **kwargs)
        w = theirs.org_module[0].weight.reshape(full[0].shape)
        return (w + multiplier * (full[0] - w), *full[1:])

    theirs.forward, theirs.get_merged_weight = scaled_forward, scaled_merged_weight
    return theirs
