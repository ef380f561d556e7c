"""LoHa (`network/loha.py`) against LyCORIS 4.1.3's LohaModule as the oracle: the same keys and shapes,
and with the same (random, non-zero) tensors the same weight change and the same outputs, on a
Linear, a 1x1 and a 3x3 Conv2d and each q/k/v/out part of a fused attention."""

import math

import pytest
import torch
from torch import nn

from lycoris.modules.loha import LohaModule

from lora_train.network import fused
from lora_train.network.loha import LoHa

from network_oracle import (KINDS, dora_as_loaders_apply, lyco_helpers, lyco_target, make_input, merged_attention,
                            needs_lyco_helpers, randomise, targets, with_module)

DIM, ALPHA = 4, 3.0  # alpha != dim: the scale (0.75) is part of every comparison unless a test says otherwise


def _target(kind):
    return targets()[kind]


def _theirs(org, part, dim=DIM, alpha=ALPHA, dora=None, **options):
    return LohaModule("lora_te_x", lyco_target(org, part), 1.0, lora_dim=dim, alpha=alpha,
                      weight_decompose=dora is not None, wd_on_out=True if dora is None else dora, **options)


def _randomise(module, seed=1):
    randomise(module, seed, magnitudes=("dora_scale",))


def _pair(kind, dim=DIM, alpha=ALPHA, dora=None, **options):
    """Ours and LyCORIS' module on the same target, LyCORIS' random, ours loaded from its state dict."""
    org, part = _target(kind)
    theirs = _theirs(org, part, dim, alpha, dora, **options)
    if dora is not None:
        dora_as_loaders_apply(theirs)
    _randomise(theirs)
    ours = LoHa("lora_te_x", org, dim, alpha, part=part, **options)
    if dora is not None:
        ours.enable_dora(wd_on_out=dora)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, org, part


def _input(org):
    return make_input(org, 2, conv=(2, 5), seq=(3, 2), rows=(2, 3))


def _their_delta_from_forward(theirs, org, part, multiplier):
    """LyCORIS' weight change as its forward applies it, read off the forward itself: for a linear,
    forward(I) - bias is the merged weight transposed."""
    lyco = theirs.org_module[0]
    theirs.multiplier = multiplier
    eye = torch.eye(lyco.in_features)
    with torch.no_grad():
        return (theirs(eye) - lyco.bias).T - lyco.weight


def _check_outputs(ours, theirs, org, part, multiplier, atol=1e-5):
    ours.multiplier = theirs.multiplier = multiplier
    x = _input(org)
    with torch.no_grad():
        want = theirs(x.reshape(-1, x.shape[-1]) if part else x)
        if part is None:
            got = with_module(ours, org, x)
        else:  # the part's projection with our delta, what LyCORIS' module on the part's Linear returns
            lyco = theirs.org_module[0]
            got = lyco(x) + ours.forward_delta(x)
            want = want.reshape(got.shape)
    assert torch.allclose(got, want, atol=atol), (got - want).abs().max()


# -- 1. keys and shapes --------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"use_tucker": True}, {"use_scalar": True}, {"use_tucker": True, "use_scalar": True}])
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_and_shapes_are_lycoris(kind, options):
    org, part = _target(kind)
    ours = LoHa("m", org, DIM, ALPHA, part=part, **options)
    theirs = _theirs(org, part, **options)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ("hada_t1" in shapes) == (kind == "conv3x3" and options.get("use_tucker", False))  # Tucker only on kxk
    assert "scalar" not in shapes  # use_scalar never reaches a file
    assert set(shapes) <= set(LoHa.suffixes)
    assert float(ours.state_dict()["alpha"]) == float(theirs.state_dict()["alpha"]) == ALPHA


@pytest.mark.parametrize("dora", [True, False])
def test_state_dict_with_dora_is_lycoris(dora):
    org, part = _target("conv3x3")
    ours = LoHa("m", org, DIM, ALPHA, use_tucker=True)
    ours.enable_dora(wd_on_out=dora)
    theirs = _theirs(org, part, dora=dora, use_tucker=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert torch.allclose(ours.state_dict()["dora_scale"], theirs.state_dict()["dora_scale"])


def test_layouts():
    """The plain layout folds the kernel into w_b; Tucker keeps it in t and transposes w_a to (dim, out)."""
    conv = nn.Conv2d(8, 6, 3, padding=1)
    plain = {k: tuple(v.shape) for k, v in LoHa("m", conv, 4, None).state_dict().items()}
    assert plain == {"alpha": (), "hada_w1_a": (6, 4), "hada_w1_b": (4, 72), "hada_w2_a": (6, 4), "hada_w2_b": (4, 72)}
    tucker = {k: tuple(v.shape) for k, v in LoHa("m", conv, 4, None, use_tucker=True).state_dict().items()}
    assert tucker == {"alpha": (), "hada_w1_a": (4, 6), "hada_w1_b": (4, 8), "hada_w2_a": (4, 6), "hada_w2_b": (4, 8),
                      "hada_t1": (4, 4, 3, 3), "hada_t2": (4, 4, 3, 3)}
    assert LoHa("m", conv, 4, None).scale == 1.0 and LoHa("m", conv, 4, 2.0).scale == 0.5


# -- 2./3./4. the weight change and the outputs --------------------------------------------------
DORA = (None, True, False)  # no DoRA, DoRA with wd_on_out=True, with wd_on_out=False
OPTION_CASES = [
    ("plain", {}),
    ("tucker", {"use_tucker": True}),
    ("scalar", {"use_scalar": True}),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_delta_is_lycoris_merged_weight_at_scale_1(kind, case):
    """alpha == dim, where LyCORIS' get_diff_weight / get_merged_weight agree with its forward. They leave
    use_scalar's scalar out (its forward has it), so LyCORIS reloads its own state dict first, as after
    loading a file: the scalar is then 1 and in hada_w1_a. Without DoRA, with DoRA on rows and on columns."""
    for dora in DORA:
        ours, theirs, org, part = _pair(kind, alpha=DIM, dora=dora, **case[1])
        theirs.load_state_dict(theirs.state_dict())
        w = theirs.org_module[0].weight
        for m in (1.0, 0.5):
            ours.multiplier = m
            with torch.no_grad():
                merged = theirs.get_merged_weight(multiplier=m, shape=w.shape)[0] - w
                got = ours.delta()
                assert torch.allclose(got, merged, atol=1e-5), (dora, m, (got - merged).abs().max())
                if dora is None:
                    assert torch.allclose(got, theirs.get_diff_weight(multiplier=m, shape=w.shape)[0], atol=1e-5)


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_are_lycoris_forward(kind, case):
    """alpha != dim; without DoRA, with DoRA on rows and on columns; multipliers 1 and 0.5."""
    for dora in DORA:
        ours, theirs, org, part = _pair(kind, dora=dora, **case[1])
        for m in (1.0, 0.5):
            _check_outputs(ours, theirs, org, part, m)
            if not isinstance(org, nn.Conv2d):  # the whole delta, read off LyCORIS' forward
                ours.multiplier = m
                with torch.no_grad():
                    want = _their_delta_from_forward(theirs, org, part, m)
                    assert torch.allclose(ours.delta(), want, atol=1e-5), (dora, m, (ours.delta() - want).abs().max())


@pytest.mark.parametrize("part", fused.PARTS)
def test_attached_attention_is_the_attention_with_lycoris_weight(part):
    """The whole attention with our part attached == the attention whose part weight LyCORIS changed."""
    ours, theirs, mha, _ = _pair(f"mha_{part}", dora=True)
    x = _input(mha)
    for m in (1.0, 0.5):
        ours.multiplier = m
        with torch.no_grad():
            changed = fused.part_weight(mha, part) + _their_delta_from_forward(theirs, mha, part, m)
            want = merged_attention(mha, part, changed, x)
            got = with_module(ours, mha, x)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_lycoris_merge_scales_twice_and_we_follow_its_forward():
    """LyCORIS 4.1.3's get_diff_weight multiplies get_weight (already alpha/dim-scaled) by alpha/dim again;
    its forward, A1111 and ComfyUI scale once. We are the forward: this pins the difference."""
    ours, theirs, org, part = _pair("linear")
    with torch.no_grad():
        assert torch.allclose(theirs.get_diff_weight(multiplier=1.0)[0], ours.delta() * ours.scale, atol=1e-6)
        assert torch.allclose(theirs.get_weight(theirs.shape), ours.delta(), atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "mha_v"])
def test_scalar_is_trained_but_not_saved(kind):
    """use_scalar: a non-1 scalar scales the change as in LyCORIS, is baked into hada_w1_a on save, and
    loading resets it to 1 (LyCORIS' load hook), so save -> load keeps the change."""
    org, part = _target(kind)
    theirs = _theirs(org, part, use_scalar=True, use_tucker=True)
    _randomise(theirs)
    ours = LoHa("m", org, DIM, ALPHA, part=part, use_scalar=True, use_tucker=True)
    with torch.no_grad():  # parameter by parameter, scalar included
        for (name, p), (their_name, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            assert name == their_name
            p.copy_(q)
    assert float(ours.scalar.detach()) not in (0.0, 1.0)
    _check_outputs(ours, theirs, org, part, 0.5)
    saved, their_saved = ours.state_dict(), theirs.state_dict()
    assert saved.keys() == their_saved.keys()
    for k in saved:
        assert torch.allclose(saved[k], their_saved[k].detach()), k
    before = ours.delta().detach()
    result = ours.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    assert float(ours.scalar.detach()) == 1.0
    assert torch.allclose(ours.delta(), before, atol=1e-6)
    # and LyCORIS reads what we write
    back = _theirs(org, part, use_scalar=True, use_tucker=True)
    back.load_state_dict(ours.state_dict())
    _check_outputs(ours, back, org, part, 1.0)


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "mha_q"])
def test_rank_dropout_drops_output_rows_as_lycoris(kind, scale):
    """In training LyCORIS masks whole output rows of dW (torch.rand(out) > p), rescaled by the kept
    fraction with rank_dropout_scale; the same seed in our dropout generator gives the same mask."""
    ours, theirs, org, part = _pair(kind, rank_dropout_scale=scale)
    theirs.rank_dropout = ours.rank_dropout = 0.5
    ours.train()
    theirs.train()
    x = _input(org)
    for seed in range(3):
        ours.dropout_generator = torch.Generator().manual_seed(seed)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # LyCORIS draws its mask from the global RNG
        with torch.no_grad():
            want = theirs(x.reshape(-1, x.shape[-1]) if part else x)
        torch.random.set_rng_state(state)
        with torch.no_grad():
            got = theirs.org_module[0](x) + ours.forward_delta(x) if part else with_module(ours, org, x)
        assert torch.allclose(got, want.reshape(got.shape), atol=1e-5), (got - want.reshape(got.shape)).abs().max()
    ours.eval()  # no dropout outside training
    kept = ours.weight_delta()
    ours.rank_dropout = None
    assert torch.equal(kept, ours.weight_delta())


# -- 5. a new module -----------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"use_tucker": True}, {"use_scalar": True}])
@pytest.mark.parametrize("kind", KINDS)
def test_new_module_is_a_no_op_and_leaves_the_global_rng(kind, options):
    org, part = _target(kind)
    state = torch.random.get_rng_state()
    a = LoHa("m", org, DIM, ALPHA, generator=torch.Generator().manual_seed(3), part=part, **options)
    b = LoHa("m", org, DIM, ALPHA, part=part, **options)  # no generator: still not the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    for module in (a, b):
        assert torch.count_nonzero(module.delta()) == 0
        assert any(torch.count_nonzero(p) for p in module.parameters())
    c = LoHa("m", org, DIM, ALPHA, generator=torch.Generator().manual_seed(3), part=part, **options)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("use_scalar", [False, True])
def test_initial_distributions_are_lycoris(use_scalar):
    m = LoHa("m", nn.Conv2d(64, 64, 3), 32, None, generator=torch.Generator().manual_seed(0), use_tucker=True,
             use_scalar=use_scalar)
    for name, std in (("hada_t1", 0.1), ("hada_t2", 0.1), ("hada_w1_a", 0.1), ("hada_w1_b", 1.0), ("hada_w2_b", 1.0)):
        p = getattr(m, name).detach()
        assert abs(float(p.std()) - std) < 0.15 * std and abs(float(p.mean())) < 0.15 * std, name
    if use_scalar:
        assert abs(float(m.hada_w2_a.detach().std()) - 0.1) < 0.015 and float(m.scalar.detach()) == 0.0
    else:
        assert torch.count_nonzero(m.hada_w2_a) == 0


# -- 6. from_weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("tucker", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_lycoris_shapes(kind, tucker):
    org, part = _target(kind)
    theirs = _theirs(org, part, dim=3, alpha=1.5, use_tucker=tucker)
    _randomise(theirs)
    weights = {k: v.detach() for k, v in theirs.state_dict().items()}
    module = LoHa.from_weights("lora_te_x", org, weights, part=part)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    assert module.lora_dim == 3 and module.scale == 0.5
    module.load_state_dict(weights)
    _check_outputs(module, theirs, org, part, 1.0)
    no_alpha = LoHa.from_weights("lora_te_x", org, {k: v for k, v in weights.items() if k != "alpha"}, part=part)
    assert no_alpha.scale == 1.0


def test_from_weights_names_the_module_and_key():
    lin = nn.Linear(8, 6)
    good = {k: v.detach() for k, v in _theirs(lin, None).state_dict().items()}
    with pytest.raises(KeyError, match=r"lora_x\.hada_w1_a: shape \(4, 9\) does not fit a Linear 8->6"):
        LoHa.from_weights("lora_x", lin, {**good, "hada_w1_a": torch.zeros(4, 9)})
    with pytest.raises(KeyError, match=r"lora_x\.hada_w2_b: shape \(4, 7\)"):
        LoHa.from_weights("lora_x", lin, {**good, "hada_w2_b": torch.zeros(4, 7)})
    with pytest.raises(KeyError, match=r"lora_x\.hada_w2_a: missing"):
        LoHa.from_weights("lora_x", lin, {k: v for k, v in good.items() if k != "hada_w2_a"})
    with pytest.raises(KeyError, match=r"lora_x\.hada_t1: Tucker factors need a conv"):
        LoHa.from_weights("lora_x", lin, {**good, "hada_t1": torch.zeros(4, 4, 3, 3), "hada_t2": torch.zeros(4, 4, 3, 3)})
    conv = nn.Conv2d(8, 6, 3, padding=1)
    tucker = {k: v.detach() for k, v in _theirs(conv, None, use_tucker=True).state_dict().items()}
    with pytest.raises(KeyError, match=r"lora_x\.hada_t2: missing"):
        LoHa.from_weights("lora_x", conv, {k: v for k, v in tucker.items() if k != "hada_t2"})
    with pytest.raises(KeyError, match=r"lora_x\.hada_t1: shape \(4, 4, 1, 1\) does not fit a Conv2d 8->6 with a 3x3 kernel"):
        LoHa.from_weights("lora_x", conv, {**tucker, "hada_t1": torch.zeros(4, 4, 1, 1)})
    plain = {k: v.detach() for k, v in _theirs(conv, None).state_dict().items()}
    with pytest.raises(KeyError, match=r"lora_x\.hada_w1_a: shape \(6, 4\)"):  # a plain w_a in a Tucker file
        LoHa.from_weights("lora_x", conv, {**plain, "hada_t1": tucker["hada_t1"], "hada_t2": tucker["hada_t2"]})


def test_claims_accepts_and_options():
    assert LoHa.claims({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    assert not LoHa.claims({"hada_w1_a", "hada_w1_b", "alpha"})
    assert LoHa.algorithm == "LoHa" and LoHa.algo == "loha" and "dora_scale" not in LoHa.suffixes
    for org in (nn.Linear(8, 6), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3)):
        assert LoHa.accepts(org)
    assert LoHa.accepts(nn.MultiheadAttention(8, 2), "q")
    assert not LoHa.accepts(nn.LayerNorm(8)) and not LoHa.accepts(nn.Conv1d(8, 6, 3))
    with pytest.raises(TypeError, match="factor"):
        LoHa("m", nn.Linear(8, 6), DIM, ALPHA, factor=4)


# -- 7. the A1111 loader -------------------------------------------------------------------------
# A1111's network_hada.py imports its `network`, which imports the WebUI's `modules.*`: it cannot be
# imported here. Its math lives in lyco_helpers.py (torch only), which we do import: calc_updown is
# make_weight_cp (Tucker) / rebuild_conventional per half, their product, times alpha/dim.
@needs_lyco_helpers
@pytest.mark.parametrize("kind,tucker", [("linear", False), ("conv1x1", False), ("conv3x3", False), ("conv3x3", True)])
def test_a1111_helpers_read_our_file(kind, tucker):
    helpers = lyco_helpers()
    org, part = _target(kind)
    ours = LoHa("m", org, DIM, ALPHA, part=part, use_tucker=tucker)
    _randomise(ours)
    w = {k: v.detach() for k, v in ours.state_dict().items()}
    if tucker:
        updown = helpers.make_weight_cp(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"]) * \
            helpers.make_weight_cp(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
    else:
        shape = [w["hada_w1_a"].shape[0], w["hada_w1_b"].shape[1]]
        updown = helpers.rebuild_conventional(w["hada_w1_a"], w["hada_w1_b"], shape) * \
            helpers.rebuild_conventional(w["hada_w2_a"], w["hada_w2_b"], shape)
    updown = updown.reshape(org.weight.shape) * float(w["alpha"]) / w["hada_w1_b"].shape[0]
    assert torch.allclose(ours.weight_delta(), updown, atol=1e-5)
    assert math.isclose(ours.scale, float(w["alpha"]) / w["hada_w1_b"].shape[0])
