"""Diag-OFT and BOFT (lora_train/network/oft.py) against LyCORIS 4.1.3's own modules, the oracle for
every expected value: keys and shapes, the weight change and the output at multipliers 1 and 0.5,
the constraint (`alpha`), `rescaled`, rank dropout, the dim -> block split, and files.

A1111's loader (extensions-builtin/Lora/network_oft.py) is not imported here: its `network` module
needs the WebUI's `modules.*`."""

import copy

import pytest
import torch
from torch import nn

from lycoris.functional import boft as lyco_boft
from lycoris.functional import diag_oft as lyco_diag
from lycoris.functional.general import factorization, power2factorization
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule

from lora_train.network.oft import BOFT, DiagOFT, butterfly_split, diag_split

from network_oracle import layers, lyco_target, make_input, merged_attention, randomise, with_module

LYCO = {DiagOFT: DiagOFTModule, BOFT: ButterflyOFTModule}
CONSTRAINT = 0.02  # small enough that the cap on ||Q|| binds for the random blocks below


def _targets():
    torch.manual_seed(0)
    return {
        **layers(),
        "mha_q": (nn.MultiheadAttention(8, 2), "q"),
        "mha_out": (nn.MultiheadAttention(8, 2), "out"),
        # BOFT needs a power-of-two block count for several butterfly stages: 16 channels
        "linear16": (nn.Linear(8, 16), None),
        "conv3x3_16": (nn.Conv2d(8, 16, 3, stride=2, padding=1), None),
    }


TARGETS = _targets()
# (algorithm, target, dim): BOFT cannot split 6 channels with a dim below 6 (LyCORIS neither)
CASES = [(DiagOFT, kind, 4) for kind in TARGETS] + [(DiagOFT, "linear", -1), (DiagOFT, "conv3x3_16", 2)] + [
    (BOFT, "linear", 6), (BOFT, "conv1x1", 6), (BOFT, "conv3x3", 6), (BOFT, "mha_q", 2), (BOFT, "mha_out", 4),
    (BOFT, "linear16", 2), (BOFT, "conv3x3_16", 4), (BOFT, "linear16", -1)]
IDS = [f"{cls.__name__}-{kind}-dim{dim}" for cls, kind, dim in CASES]


def _target(kind):
    org, part = TARGETS[kind]
    return copy.deepcopy(org), part


def _pair(cls, kind, dim, *, rescaled=False, constraint=0.0, seed=1, **lyco_options):
    """(ours, LyCORIS' module, target, part), LyCORIS filled with random non-zero values copied into ours."""
    org, part = _target(kind)
    lyco = LYCO[cls]("m", lyco_target(org, part, bias=False), 1.0, lora_dim=dim, alpha=1.0, constraint=constraint,
                     rescaled=rescaled, **lyco_options)
    randomise(lyco, seed, scale=0.3, offsets={"rescale": 1.0})
    ours = cls("m", org, dim, None, part=part, constraint=constraint, rescaled=rescaled)
    ours.load_state_dict(lyco.state_dict())
    return ours, lyco, org, part


def _lyco_delta(lyco, m):
    # get_merged_weight - W: LyCORIS 4.1.3's Diag-OFT get_diff_weight crashes at m != 1 with rescale
    return lyco.get_merged_weight(multiplier=m)[0] - lyco.org_module[0].weight


def _input(org):
    return make_input(org, 2, conv=(2, 7), seq=(5, 2), rows=(3, 4))


def _shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# -- 1. keys and shapes ------------------------------------------------------------------------
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("cls,kind,dim", CASES, ids=IDS)
def test_keys_and_shapes_are_lycoris(cls, kind, dim, rescaled):
    ours, lyco, _, _ = _pair(cls, kind, dim, rescaled=rescaled, constraint=CONSTRAINT)
    assert _shapes(ours) == _shapes(lyco)
    assert set(ours.state_dict()) <= set(cls.suffixes)
    assert {"oft_blocks"} == set(cls.suffixes) - set(cls.optional)
    assert float(ours.state_dict()["alpha"]) == pytest.approx(CONSTRAINT)  # alpha is the constraint
    assert ours.scale == 1.0


def test_network_alpha_is_ignored_and_alpha_holds_the_constraint():
    org, _ = _target("linear")
    module = DiagOFT("m", org, 4, 8.0, constraint=0.5)
    assert float(module.alpha) == 0.5 and module.scale == 1.0 and module.constraint == 0.5 * 6


# -- 2. the change and the output --------------------------------------------------------------
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("cls,kind,dim", CASES, ids=IDS)
def test_delta_and_output_match_lycoris(cls, kind, dim, rescaled):
    for constraint in (0.0, CONSTRAINT):
        ours, lyco, org, part = _pair(cls, kind, dim, rescaled=rescaled, constraint=constraint)
        x = _input(org)
        for m in (1.0, 0.5):
            ours.multiplier = lyco.multiplier = m
            with torch.no_grad():
                want = _lyco_delta(lyco, m)
                torch.testing.assert_close(ours.delta(), want, atol=1e-5, rtol=1e-5)
                assert want.abs().max() > 1e-3  # not an empty check
                if part is None:
                    want_out = lyco(x)
                else:  # the attention with the part's weight as LyCORIS merges it
                    want_out = merged_attention(org, part, lyco.get_merged_weight(multiplier=m)[0], x)
                got = with_module(ours, org, x)
            torch.testing.assert_close(got, want_out, atol=1e-5, rtol=1e-5)
            if m == 1.0:
                torch.testing.assert_close(ours.weight_delta(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,kind,dim", [(DiagOFT, "linear", 4), (BOFT, "linear16", 2)])
def test_the_constraint_binds_in_these_tests(cls, kind, dim):
    capped, _, _, _ = _pair(cls, kind, dim, constraint=CONSTRAINT)
    free, _, _, _ = _pair(cls, kind, dim)
    with torch.no_grad():
        assert (capped.delta() - free.delta()).abs().max() > 1e-2


def test_multiplier_is_lycoris_not_a_plain_factor():
    # BOFT interpolates each stage and the rescale stays whole: dW(0.5) != dW(1) / 2 (A1111 halves it)
    ours, _, _, _ = _pair(BOFT, "linear16", 2, rescaled=True)
    with torch.no_grad():
        full = ours.delta()
        ours.multiplier = 0.5
        assert not torch.allclose(ours.delta(), full / 2, atol=1e-3)
        ours.multiplier = 0.0
        rescale_only = (ours.rescale - 1) * ours.org_weight()
        torch.testing.assert_close(ours.delta(), rescale_only)


# -- 3. DoRA: LyCORIS has none for OFT ---------------------------------------------------------
@pytest.mark.parametrize("cls", [DiagOFT, BOFT])
def test_no_dora(cls):
    org, _ = _target("linear16")
    lyco = LYCO[cls]("m", org, 1.0, lora_dim=4, weight_decompose=True, wd_on_out=True)
    assert "dora_scale" not in lyco.state_dict()  # LyCORIS ignores dora_wd for OFT
    with pytest.raises(TypeError, match="DoRA"):
        cls("m", org, 4, None).enable_dora()


# -- 4. options --------------------------------------------------------------------------------
def test_dim_splits_channels_as_lycoris():
    for out in [*range(1, 41), 48, 64, 96, 320, 768]:
        for dim in [-1, *range(1, 42), 64, 80, 128]:
            assert diag_split(out, dim) == factorization(out, dim), (out, dim)
            size, count = power2factorization(out, dim)
            assert butterfly_split(out, dim) == (None if count == 0 else (size, count)), (out, dim)


@pytest.mark.parametrize("cls", [DiagOFT, BOFT])
def test_unknown_option_is_refused(cls):
    org, _ = _target("linear16")
    with pytest.raises(TypeError, match="use_tucker"):
        cls("m", org, 4, None, use_tucker=True)


def test_boft_refuses_a_split_that_does_not_exist_as_lycoris_does():
    org, _ = _target("linear")
    with pytest.raises(ValueError):
        ButterflyOFTModule("m", org, 1.0, lora_dim=4)
    with pytest.raises(ValueError, match="m: BOFT cannot split 6 channels"):
        BOFT("m", org, 4, None)


class _Masked(nn.Module):
    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, t):
        return t * self.mask / (1 - self.p) if self.training else t


@pytest.mark.parametrize("m", [1.0, 0.5])
@pytest.mark.parametrize("rescaled", [False, True])
def test_diag_oft_rank_dropout_is_lycoris(rescaled, m):
    p = 0.3
    ours, lyco, _, _ = _pair(DiagOFT, "conv3x3_16", 2, rescaled=rescaled, rank_dropout=p)
    ours.rank_dropout = p
    ours.dropout_generator = torch.Generator().manual_seed(7)
    mask = torch.rand(ours.oft_blocks.shape, generator=torch.Generator().manual_seed(7)) > p
    lyco.rank_drop = _Masked(mask, p)  # LyCORIS' nn.Dropout, with our mask
    ours.train(), lyco.train()
    ours.multiplier = m
    with torch.no_grad():
        torch.testing.assert_close(ours.delta(), _lyco_delta(lyco, m), atol=1e-5, rtol=1e-5)
        ours.eval(), lyco.eval()
        torch.testing.assert_close(ours.delta(), _lyco_delta(lyco, m), atol=1e-5, rtol=1e-5)


def test_boft_has_no_rank_dropout():
    ours, _, _, _ = _pair(BOFT, "linear16", 2)
    with torch.no_grad():
        want = ours.delta()
        ours.rank_dropout = 0.5
        ours.dropout_generator = torch.Generator().manual_seed(0)
        ours.train()
        torch.testing.assert_close(ours.delta(), want)


# -- 5. a fresh module ---------------------------------------------------------------------------
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("cls,kind,dim", CASES, ids=IDS)
def test_fresh_module_is_a_no_op_and_draws_nothing(cls, kind, dim, rescaled):
    org, part = _target(kind)
    state = torch.random.get_rng_state()
    module = cls("m", org, dim, 1.0, torch.Generator().manual_seed(0), part=part, rescaled=rescaled)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        delta = module.delta()
    assert delta.shape == module.target_shape and not delta.any()


# -- 6. files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("cls,kind,dim", CASES, ids=IDS)
def test_from_weights_rebuilds_lycoris_modules(cls, kind, dim, rescaled):
    _, lyco, org, part = _pair(cls, kind, dim, rescaled=rescaled, constraint=CONSTRAINT)
    weights = dict(lyco.state_dict())
    assert cls.fits(weights) and not ({DiagOFT, BOFT} - {cls}).pop().fits(weights)
    module = cls.from_weights("m", org, weights, part=part)
    assert _shapes(module) == _shapes(lyco)
    module.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(module.delta(), _lyco_delta(lyco, 1.0), atol=1e-5, rtol=1e-5)


def test_from_weights_takes_the_file_layout_lycoris_would_not_pick():
    # count < size (kohya's networks.oft: dim = block count) and BOFT with fewer stages: A1111 reads
    # both; LyCORIS' functional diff_weight is the oracle for any layout
    org, _ = _target("linear16")
    g = torch.Generator().manual_seed(4)
    for cls, blocks, diff in [(DiagOFT, torch.randn(2, 8, 8, generator=g) * 0.2, lyco_diag.diff_weight),
                              (BOFT, torch.randn(2, 4, 4, 4, generator=g) * 0.2, lyco_boft.diff_weight)]:
        weights = {"oft_blocks": blocks, "alpha": torch.tensor(CONSTRAINT)}
        module = cls.from_weights("m", org, weights)
        assert module.layout == tuple(blocks.shape[:-1])
        module.load_state_dict(weights)
        with torch.no_grad():
            want = diff(org.weight, blocks, None, constraint=CONSTRAINT * 16)
            torch.testing.assert_close(module.delta(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,key,bad", [
    (DiagOFT, "oft_blocks", (4, 2, 2)),        # 8 rows, the target has 6
    (DiagOFT, "oft_blocks", (3, 2, 3)),        # not square
    (DiagOFT, "oft_blocks", (1, 3, 2, 2)),     # BOFT's, not Diag-OFT's
    (DiagOFT, "rescale", (6,)),
    (BOFT, "oft_blocks", (1, 3, 2, 2)),        # 3 blocks: not a power of two
    (BOFT, "oft_blocks", (1, 2, 3, 3)),        # odd block size
    (BOFT, "oft_blocks", (3, 1, 6, 6)),        # more stages than one block allows
    (BOFT, "oft_blocks", (3, 2, 2)),           # Diag-OFT's
    (BOFT, "rescale", (6, 1, 1, 1)),
])
def test_from_weights_names_a_wrong_shape(cls, key, bad):
    org, _ = _target("linear")
    weights = {"oft_blocks": torch.zeros((3, 2, 2) if cls is DiagOFT else (1, 1, 6, 6)), "alpha": torch.tensor(0.0)}
    weights[key] = torch.zeros(bad)
    with pytest.raises(KeyError, match=rf"m\.{key}: shape \({bad[0]},.*a Linear 8->6"):
        cls.from_weights("m", org, weights)


@pytest.mark.parametrize("cls", [DiagOFT, BOFT])
def test_from_weights_names_a_missing_key(cls):
    org, part = _target("mha_q")
    with pytest.raises(KeyError, match=r"m\.oft_blocks: missing"):
        cls.from_weights("m", org, {"alpha": torch.tensor(0.0)}, part=part)


def test_attention_part_rescale_is_a_linear_one():
    org, part = _target("mha_out")
    module = DiagOFT.from_weights("m", org, {"oft_blocks": torch.zeros(4, 2, 2), "rescale": torch.ones(8, 1)}, part=part)
    assert module.rescale.shape == (8, 1) and module.layout == (4, 2)
    with torch.no_grad():
        assert module.delta().shape == (8, 8) and not module.delta().any()
