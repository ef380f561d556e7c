"""LoKr (`network/lokr.py`) against LyCORIS 4.1.3's LokrModule as the oracle: the same factorisation,
keys and shapes, and with the same (random, non-zero) tensors the same weight change and the same
outputs, on a Linear, a 1x1 and a 3x3 Conv2d and each q/k/v/out part of a fused attention, in every
layout LoKr has (w2 low-rank / Tucker / full, w1 full / factorised, both full)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lycoris.functional.general import factorization as lyco_factorization
from lycoris.modules.lokr import LokrModule

from lora_train.network import fused
from lora_train.network.lokr import LoKr, factorization

from network_oracle import (lyco_helpers, lyco_target, make_input, merged_attention, needs_lyco_helpers, randomise, targets,
                            with_module)

ALPHA = 0.75  # != dim, so the scale shows in every comparison where LoKr has one


def _larger():
    """Larger targets, where decompose_both and factor have room to change the layout."""
    return {
        "linear64": (nn.Linear(64, 48), None),
        "linear4to48": (nn.Linear(4, 48), None),
        "conv32": (nn.Conv2d(32, 24, 3, stride=1, padding=1), None),
    }


def _target(kind):
    return targets(_larger)[kind]


# (kind, dim, options): with 8->6, out = 2 x 3 and in = 2 x 4, so w1 is (2, 2) and w2 (3, 4[, 3, 3]);
# dim 1 < max(3, 4) / 2 makes w2 low-rank, dim 2 makes it full (and, w1 being full, scale 1)
CONFIGS = [
    *[(k, 1, {}) for k in ("linear", "conv1x1", "conv3x3", "mha_q", "mha_k", "mha_v", "mha_out")],
    *[(k, 2, {}) for k in ("linear", "conv1x1", "conv3x3", "mha_out")],
    ("linear", 1, {"full_matrix": True}),
    ("conv3x3", 1, {"use_tucker": True}),
    ("conv3x3", 1, {"use_tucker": True, "full_matrix": True}),
    ("conv1x1", 1, {"use_tucker": True}),  # no Tucker on a 1x1 kernel
    ("linear", 1, {"use_tucker": True}),  # nor on a Linear
    ("linear", 1, {"use_scalar": True}),
    ("linear", 2, {"use_scalar": True}),
    ("conv3x3", 1, {"use_scalar": True, "use_tucker": True}),
    ("linear", 1, {"unbalanced_factorization": True}),
    ("linear64", 2, {"decompose_both": True}),
    ("linear64", 2, {"factor": 4}),
    ("linear64", 2, {"decompose_both": True, "factor": 16}),
    ("linear64", 2, {"decompose_both": True, "full_matrix": True}),
    ("linear4to48", 3, {"decompose_both": True, "unbalanced_factorization": True}),  # w1 factorised, w2 full
    ("conv32", 1, {"decompose_both": True, "use_tucker": True}),
    ("conv32", 2, {"factor": 2}),
    ("conv32", 1, {"decompose_both": True, "use_scalar": True}),
]
IDS = [f"{k}-dim{d}-" + ("-".join(f"{o}={v}" for o, v in opts.items()) or "plain") for k, d, opts in CONFIGS]


def _theirs(org, part, dim, alpha=ALPHA, dora=None, **options):
    """LyCORIS' module on a copy of the target, or on an attention part's twin."""
    return LokrModule("lora_te_x", lyco_target(org, part, copy_org=True), 1.0, lora_dim=dim, alpha=alpha,
                      weight_decompose=dora is not None, wd_on_out=True if dora is None else dora, **options)


def _randomise(module, seed=1):
    randomise(module, seed, magnitudes=("dora_scale", "scalar"))


def _pair(kind, dim, dora=None, alpha=ALPHA, **options):
    """Ours and LyCORIS' module on the same target (float64), LyCORIS' random, ours loaded from its
    state dict (its scalar, when there is one, folded into w1 as LyCORIS saves it)."""
    org, part = _target(kind)
    org = org.double()
    theirs = _theirs(org, part, dim, alpha, dora, **options).double()
    _randomise(theirs)
    ours = LoKr("lora_te_x", org, dim, alpha, part=part, **options)
    if dora is not None:
        ours.enable_dora(wd_on_out=dora)
    ours.double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, org, part


def _input(org):
    return make_input(org, 2, conv=(2, 5), seq=(4, 2), rows=(2, 3), dtype=torch.float64)


def _their_delta(theirs, x):
    """LyCORIS' weight change as its forward applies it (captured from the op it calls), and its output."""
    seen = []
    op = theirs.op

    def capture(inp, weight, *args, **kwargs):
        seen.append(weight)
        return op(inp, weight, *args, **kwargs)

    theirs.op = capture
    try:
        y = theirs(x)
    finally:
        theirs.op = op
    return seen[0], y


def _merged_attention(org, part, delta, x):
    return merged_attention(org, part, fused.part_weight(org, part) + delta, x)


# -- factorization -------------------------------------------------------------------------------
def test_factorization_matches_lycoris():
    sizes = [*range(1, 700), 720, 768, 960, 1024, 1152, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 10240, 7919]
    factors = [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 64, 100, 1000]
    wrong = [(d, f, factorization(d, f), lyco_factorization(d, f)) for d in sizes for f in factors
             if factorization(d, f) != lyco_factorization(d, f)]
    assert not wrong, wrong[:5]


# -- 1. keys and shapes --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dim,options", CONFIGS, ids=IDS)
def test_keys_and_shapes_match_lycoris(kind, dim, options):
    org, part = _target(kind)
    theirs = {k: tuple(v.shape) for k, v in _theirs(org, part, dim, **options).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in LoKr("lora_te_x", org, dim, ALPHA, part=part, **options).state_dict().items()}
    assert ours == theirs
    assert set(ours) <= set(LoKr.suffixes)


def test_layout_rules():
    org, _ = _target("linear")
    assert set(LoKr("m", org, 1, ALPHA).state_dict()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
    assert set(LoKr("m", org, 2, ALPHA).state_dict()) == {"lokr_w1", "lokr_w2", "alpha"}
    conv, _ = _target("conv3x3")
    sd = LoKr("m", conv, 1, ALPHA, use_tucker=True).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items() if k != "alpha"} == {
        "lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 3), "lokr_w2_b": (1, 4)}
    sd = LoKr("m", conv, 1, ALPHA).state_dict()
    assert tuple(sd["lokr_w2_a"].shape) == (3, 1) and tuple(sd["lokr_w2_b"].shape) == (1, 36)


# -- scale ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dim,options", CONFIGS, ids=IDS)
def test_scale_and_alpha_match_lycoris(kind, dim, options):
    org, part = _target(kind)
    theirs = _theirs(org, part, dim, **options)
    ours = LoKr("lora_te_x", org, dim, ALPHA, part=part, **options)
    assert ours.scale == pytest.approx(theirs.scale)
    assert float(ours.state_dict()["alpha"]) == pytest.approx(float(theirs.state_dict()["alpha"]))
    both_full = "lokr_w1" in theirs.state_dict() and "lokr_w2" in theirs.state_dict()
    assert ours.scale == (1.0 if both_full else ALPHA / dim)


def _a1111_scale(state):
    """The WebUI v1.10 rule (network_lokr.py + network.py calc_scale): the rank is lokr_w1_b's, then
    lokr_w2_b's rows; with neither, alpha is ignored and the scale is 1."""
    dim = None
    if "lokr_w1_b" in state:
        dim = state["lokr_w1_b"].shape[0]
    if "lokr_w2_b" in state:
        dim = state["lokr_w2_b"].shape[0]
    return float(state["alpha"]) / dim if dim is not None and "alpha" in state else 1.0


@pytest.mark.parametrize("kind,dim,options", CONFIGS, ids=IDS)
def test_a1111_scale_rule_agrees_with_lycoris(kind, dim, options):
    org, part = _target(kind)
    theirs = _theirs(org, part, dim, **options)
    ours = LoKr("lora_te_x", org, dim, ALPHA, part=part, **options)
    assert _a1111_scale(theirs.state_dict()) == pytest.approx(theirs.scale)
    assert _a1111_scale(ours.state_dict()) == pytest.approx(ours.scale)


def test_a1111_scale_rule_disagrees_with_lycoris_rs_lora_full_matrix():
    """The one LyCORIS mode where the WebUI reads another scale than LyCORIS trains with: rs_lora with
    both halves full (LyCORIS sqrt(dim), the file then has no rank to read, so 1). Why LoKr here
    has no rs_lora option."""
    org, _ = _target("linear")
    lowrank = _theirs(org, None, 1, rs_lora=True)
    assert _a1111_scale(lowrank.state_dict()) == pytest.approx(lowrank.scale)  # agrees when a rank is in the file
    full = _theirs(org, None, 4, rs_lora=True)
    assert full.scale == pytest.approx(2.0) and _a1111_scale(full.state_dict()) == 1.0
    with pytest.raises(TypeError, match="rs_lora"):
        LoKr("m", org, 4, ALPHA, rs_lora=True)


# -- 2, 3, 4. the same change and output ------------------------------------------------------------
@pytest.mark.parametrize("dora", [None, True, False], ids=["plain", "dora_out", "dora_in"])
@pytest.mark.parametrize("kind,dim,options", CONFIGS, ids=IDS)
def test_same_delta_and_output_as_lycoris(kind, dim, options, dora):
    ours, theirs, org, part = _pair(kind, dim, dora, **options)
    x = _input(org)
    for m in (1.0, 0.5):
        ours.multiplier = theirs.multiplier = m
        if dora is None:
            expected_delta, expected_y = _their_delta(theirs, x)
        else:  # DoRA: the whole change times m, as A1111 and ComfyUI apply it (network/dora.py); LyCORIS at m = 1
            theirs.multiplier = 1.0
            delta_1, y_1 = _their_delta(theirs, x)
            base = theirs.org_forward(x)
            expected_delta, expected_y = m * delta_1, base + m * (y_1 - base)
        with torch.no_grad():
            assert torch.allclose(ours.delta(), expected_delta, atol=1e-10)
            if part is None:
                assert torch.allclose(with_module(ours, org, x), expected_y, atol=1e-10)
            else:
                w = fused.part_weight(org, part)
                b = org.out_proj.bias if part == "out" else org.in_proj_bias.chunk(3)["qkv".index(part)]
                assert torch.allclose(F.linear(x, w, b) + ours.forward_delta(x), expected_y, atol=1e-10)
                assert torch.allclose(with_module(ours, org, x), _merged_attention(org, part, expected_delta, x), atol=1e-10)
        assert not ours.attached


def test_float32_output():
    org, _ = _target("linear")
    theirs = _theirs(org, None, 1)
    _randomise(theirs)
    ours = LoKr("m", org, 1, ALPHA)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 8)
    assert torch.allclose(with_module(ours, org, x), theirs(x), atol=1e-5)


def test_lycoris_merge_path_scales_twice():
    """LyCORIS 4.1.3's get_diff_weight / get_merged_weight multiply by the scale a second time (its
    get_weight has it already); its forward, bypass and the WebUI scale once. We are the forward:
    this pins the difference, and that it vanishes when the scale is 1."""
    ours, theirs, *_ = _pair("linear", 1)
    with torch.no_grad():
        assert torch.allclose(theirs.get_diff_weight(multiplier=1.0)[0], ours.delta() * ours.scale, atol=1e-10)
    ours, theirs, *_ = _pair("linear", 2)  # both halves full: scale 1
    with torch.no_grad():
        assert torch.allclose(theirs.get_diff_weight(multiplier=1.0)[0], ours.delta(), atol=1e-10)


# -- rank dropout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "rank_dropout_scale"])
@pytest.mark.parametrize("kind,dim,dora,options", [
    ("linear64", 2, None, {}), ("linear", 2, None, {}), ("conv3x3", 1, None, {"use_tucker": True}),
    ("linear64", 2, True, {"decompose_both": True}), ("mha_v", 1, None, {}),
])
def test_rank_dropout_as_lycoris(kind, dim, dora, options, scale):
    ours, theirs, org, part = _pair(kind, dim, dora, **options, rank_dropout_scale=scale)
    theirs.rank_dropout = ours.rank_dropout = 0.5
    ours.train()
    theirs.train()
    x = _input(org)
    for seed in (4, 5):
        torch.manual_seed(seed)  # LyCORIS draws from the global RNG ...
        expected_delta, expected_y = _their_delta(theirs, x)
        ours.dropout_generator = torch.Generator().manual_seed(seed)  # ... we from our own, same stream
        with torch.no_grad():
            assert torch.allclose(ours.delta(), expected_delta, atol=1e-10)
            ours.dropout_generator = torch.Generator().manual_seed(seed)
            if part is None:
                assert torch.allclose(with_module(ours, org, x), expected_y, atol=1e-10)
            else:
                w = fused.part_weight(org, part)
                b = org.in_proj_bias.chunk(3)["qkv".index(part)]
                assert torch.allclose(F.linear(x, w, b) + ours.forward_delta(x), expected_y, atol=1e-10)
    if dora is None:
        dropped = (expected_delta.flatten(1) == 0).all(dim=1)
        assert 0 < int(dropped.sum()) < dropped.numel()  # the seeds above really drop some rows, not all
    ours.eval()
    ours.dropout_generator = None
    with torch.no_grad():
        assert not (ours.delta().flatten(1) == 0).all(dim=1).any()  # eval: nothing dropped


def test_rank_dropout_scale_with_every_row_dropped_is_zero_not_nan():
    """Seed 3 drops all 6 rows: LyCORIS divides by their mean, 0, and gets NaN; we keep the zeros."""
    ours, theirs, org, _ = _pair("linear", 2, rank_dropout_scale=True)
    ours.rank_dropout = theirs.rank_dropout = 0.5
    ours.train()
    theirs.train()
    torch.manual_seed(3)
    assert torch.isnan(_their_delta(theirs, _input(org))[0]).all()
    ours.dropout_generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        assert torch.equal(ours.delta(), torch.zeros_like(ours.delta()))


# -- use_scalar ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dim,options", [("linear", 1, {}), ("linear", 2, {}), ("linear64", 2, {"decompose_both": True})])
def test_use_scalar_is_folded_into_w1_in_files_as_lycoris(kind, dim, options):
    org, part = _target(kind)
    theirs = _theirs(org, part, dim, use_scalar=True, **options)
    ours = LoKr("m", org, dim, ALPHA, part=part, use_scalar=True, **options)
    assert "scalar" not in ours.state_dict() and "scalar" in dict(ours.named_parameters())
    _randomise(theirs)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(dict(theirs.named_parameters())[name])
    assert float(ours.scalar.detach()) != 1.0
    before = ours.delta().detach().clone()
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    for k in theirs_sd:
        assert torch.allclose(ours_sd[k], theirs_sd[k]), k
    ours.load_state_dict(ours_sd)  # a file's w1 holds the scalar: loading sets it to 1, as LyCORIS does
    assert float(ours.scalar.detach()) == 1.0
    assert torch.allclose(ours.delta(), before, atol=1e-6)


# -- 5. a fresh module ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dim,options", CONFIGS, ids=IDS)
def test_fresh_module_is_a_noop_and_leaves_the_rng_alone(kind, dim, options):
    org, part = _target(kind)
    state = torch.random.get_rng_state()
    ours = LoKr("m", org, dim, ALPHA, torch.Generator().manual_seed(5), part=part, **options)
    unseeded = LoKr("m", org, dim, ALPHA, part=part, **options)
    assert torch.equal(torch.random.get_rng_state(), state)
    for module in (ours, unseeded):
        with torch.no_grad():
            assert torch.equal(module.delta(), torch.zeros(module.target_shape))
    # the same tensors are zero as in LyCORIS' fresh module, the others drawn as LyCORIS draws them
    theirs = dict(_theirs(org, part, dim, **options).named_parameters())
    for name, p in ours.named_parameters():
        if name == "scalar":
            assert float(p.detach()) == 0.0 and float(theirs[name].detach()) == 0.0
            continue
        assert bool((p == 0).all()) == bool((theirs[name] == 0).all()), name
        bound = 1.0 / math.sqrt(p[0].numel())
        assert float(p.detach().abs().max()) <= bound and float(theirs[name].detach().abs().max()) <= bound


def test_generator_makes_it_reproducible():
    org, _ = _target("conv32")
    a = LoKr("m", org, 1, ALPHA, torch.Generator().manual_seed(7), decompose_both=True, use_tucker=True)
    b = LoKr("m", org, 1, ALPHA, torch.Generator().manual_seed(7), decompose_both=True, use_tucker=True)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


# -- 6. from_weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dim,options", CONFIGS, ids=IDS)
def test_from_weights_rebuilds_lycoris_files(kind, dim, options):
    ours, theirs, org, part = _pair(kind, dim, **options)
    state = theirs.state_dict()
    rebuilt = LoKr.from_weights("lora_te_x", org, dict(state), part=part).double()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert LoKr.claims(set(state))
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(rebuilt.delta(), ours.delta(), atol=1e-10)
    assert rebuilt.scale == pytest.approx(theirs.scale)


def test_from_weights_full_matrix_file_is_scale_one_whatever_its_alpha():
    ours, theirs, org, _ = _pair("linear", 4)
    state = theirs.state_dict() | {"alpha": torch.tensor(3.0)}
    rebuilt = LoKr.from_weights("m", org, state).double()
    rebuilt.load_state_dict(state)
    assert rebuilt.scale == 1.0 and rebuilt.lora_dim == 1  # LyCORIS rebuilds these with lora_dim 1
    with torch.no_grad():
        assert torch.allclose(rebuilt.delta(), ours.delta(), atol=1e-10)


def test_from_weights_without_alpha_is_scale_one():
    ours, theirs, org, _ = _pair("linear", 1)
    state = {k: v for k, v in theirs.state_dict().items() if k != "alpha"}
    rebuilt = LoKr.from_weights("m", org, state)
    assert rebuilt.scale == 1.0


@pytest.mark.parametrize("drop,bad,key", [
    (None, {"lokr_w2_b": torch.zeros(1, 9)}, "lokr_w2_b"),
    (None, {"lokr_w1": torch.zeros(4, 4)}, "lokr_w1"),
    (None, {"lokr_w1": torch.zeros(2, 2, 1)}, "lokr_w1"),
    (None, {"lokr_w2_a": torch.zeros(4, 1)}, "lokr_w2_a"),
    ("lokr_w1", None, "lokr_w1"),
    ("lokr_w2_b", None, "lokr_w2_b"),
    ("lokr_w2_a", None, "lokr_w2_a"),
])
def test_from_weights_errors_name_module_and_key(drop, bad, key):
    org, _ = _target("linear")
    state = dict(LoKr("m", org, 1, ALPHA).state_dict())
    state.pop(drop, None)
    state |= bad or {}
    with pytest.raises(KeyError, match=rf"lora_te_x\.{key}"):
        LoKr.from_weights("lora_te_x", org, state)


def test_from_weights_errors_for_conv_layouts():
    conv, _ = _target("conv3x3")
    tucker = dict(LoKr("m", conv, 1, ALPHA, use_tucker=True).state_dict())
    with pytest.raises(KeyError, match=r"lora_te_x\.lokr_t2: shape \(1, 1, 1, 1\) does not fit a Conv2d 8->6 with a 3x3 kernel"):
        LoKr.from_weights("lora_te_x", conv, tucker | {"lokr_t2": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(KeyError, match=r"lora_te_x\.lokr_w2_b"):  # a plain conv w2_b carries the kernel
        LoKr.from_weights("lora_te_x", conv, dict(LoKr("m", conv, 1, ALPHA).state_dict()) | {"lokr_w2_b": torch.zeros(1, 4)})
    lin, _ = _target("linear")
    with pytest.raises(KeyError, match=r"lora_te_x\.lokr_t2"):
        LoKr.from_weights("lora_te_x", lin, tucker)
    big, _ = _target("linear64")
    both = dict(LoKr("m", big, 2, ALPHA, decompose_both=True).state_dict())
    with pytest.raises(KeyError, match=r"lora_te_x\.lokr_w1_b"):
        LoKr.from_weights("lora_te_x", big, {k: v for k, v in both.items() if k != "lokr_w1_b"})
    with pytest.raises(KeyError, match=r"lora_te_x\.lokr_w2: missing"):
        LoKr.from_weights("lora_te_x", big, {k: v for k, v in both.items() if not k.startswith("lokr_w2")})
    with pytest.raises(KeyError, match=r"lora_te_x\.lokr_w2_b: rank"):
        LoKr.from_weights("lora_te_x", big, both | {"lokr_w2_a": torch.zeros(8, 3), "lokr_w2_b": torch.zeros(3, 8)})


def test_claims():
    assert LoKr.claims({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"})
    assert LoKr.claims({"lokr_w1_a", "lokr_w1_b", "lokr_w2"})
    assert not LoKr.claims({"lokr_w1", "lokr_w2_a"})
    assert not LoKr.claims({"lora_down.weight", "lora_up.weight", "alpha"})
    assert not LoKr.claims({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})


# -- options and targets ----------------------------------------------------------------------------
def test_options():
    org, _ = _target("linear")
    with pytest.raises(TypeError, match="bogus"):
        LoKr("m", org, 1, ALPHA, bogus=1)
    # network args arrive as text: "False" must not switch an option on
    big, _ = _target("linear64")
    assert "lokr_w1" in LoKr("m", big, 2, ALPHA, decompose_both="False").state_dict()
    assert "lokr_w1_a" in LoKr("m", big, 2, ALPHA, decompose_both="true", factor="-1").state_dict()


def test_accepts():
    assert LoKr.accepts(nn.Linear(8, 6)) and LoKr.accepts(nn.Conv2d(8, 6, 1)) and LoKr.accepts(nn.Conv2d(8, 6, 3))
    assert LoKr.accepts(nn.MultiheadAttention(8, 2), "q")
    assert not LoKr.accepts(nn.Embedding(4, 8)) and not LoKr.accepts(nn.Conv1d(8, 6, 3))


# -- 7. the A1111 loader ---------------------------------------------------------------------------
# A1111's network_lokr.py imports its `network`, which imports the WebUI's `modules.*`: it cannot be
# imported here, so this point is not tested with the loader itself. Its math uses lyco_helpers.py
# (torch only), which we do import: calc_updown is kron(w1, w2), w2 from make_weight_cp for Tucker,
# reshaped to the target, times the scale rule above (`_a1111_scale`).
@needs_lyco_helpers
@pytest.mark.parametrize("kind,dim,options", [
    ("linear", 1, {}), ("linear", 2, {}), ("conv1x1", 1, {}), ("conv3x3", 1, {}), ("conv3x3", 1, {"use_tucker": True}),
    ("conv3x3", 2, {}), ("linear64", 2, {"decompose_both": True}), ("linear4to48", 3, {"decompose_both": True, "unbalanced_factorization": True}),
])
def test_a1111_helpers_read_our_file(kind, dim, options):
    helpers = lyco_helpers()
    ours, _, org, part = _pair(kind, dim, **options)
    w = {k: v.detach() for k, v in ours.state_dict().items()}
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2 = helpers.make_weight_cp(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    updown = torch.kron(w1, w2.contiguous()).reshape(ours.target_shape) * _a1111_scale(w)
    with torch.no_grad():
        assert torch.allclose(updown, ours.delta(), atol=1e-10)
    # the WebUI's copy of LyCORIS' factorization agrees with ours too
    assert all(helpers.factorization(d, f) == factorization(d, f) for d in range(1, 300) for f in (-1, 2, 4, 8))
