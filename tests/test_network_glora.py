"""GLoRA (lora_train/network/glora.py) against LyCORIS 4.1.3's GLoRAModule, the oracle for the math,
and A1111 v1.10's network_glora.py, the reader whose key names we write (run with the few WebUI
modules its network.py imports faked).

The two name the same four matrices differently: A1111 (and LyCORIS 2.x) has a1/b1 as the down
projections and a2/b2 as the up ones, LyCORIS 3+ the other way round. LyCORIS' tensors are copied in
under our names with 1 and 2 exchanged, and compared with alpha = dim, where LyCORIS' alpha/dim scale
is the 1 that A1111 applies."""

import math

import pytest
import torch

from lora_train.network.glora import GLoRA

from network_oracle import (KINDS, a1111_fixture, a1111_updown, make_input, merged_attention, output, randomise, twin_target,
                            with_module)

lycoris_glora = pytest.importorskip("lycoris.modules.glora")

DIM = 4
SWAP = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight", "b2.weight": "b1.weight"}


def _input(org):
    return make_input(org, 3, conv=(2, 7), seq=(5, 2), rows=(3, 5))


def _lyco(twin, **options):
    # alpha = dim: LyCORIS' scale alpha/dim is then 1, A1111's (and ours)
    return lycoris_glora.GLoRAModule("lyco", twin, 1.0, lora_dim=DIM, alpha=DIM, **options)


def _ours_from_lycoris(state):
    """LyCORIS 3+'s state dict under A1111's names."""
    return {SWAP.get(k, k): v for k, v in state.items()}


@pytest.mark.parametrize("use_scalar", [False, True], ids=["plain", "scalar"])
@pytest.mark.parametrize("kind", KINDS)
def test_keys_and_shapes_are_lycoris_under_a1111_names(kind, use_scalar):
    org, part, twin = twin_target(kind)
    ours = GLoRA("lora_unet_x", org, DIM, 1.0, part=part, use_scalar=use_scalar).state_dict()
    theirs = _ours_from_lycoris(_lyco(twin, use_scalar=use_scalar).state_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(ours) == set(GLoRA.suffixes)  # the scalar is folded in, never a key
    assert float(ours["alpha"]) == DIM  # whatever alpha is asked for: see glora.py


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_delta_and_output_match_lycoris(kind, multiplier):
    org, part, twin = twin_target(kind)
    lyco = _lyco(twin)
    randomise(lyco)
    ours = GLoRA("lora_unet_x", org, DIM, DIM, part=part)
    ours.load_state_dict(_ours_from_lycoris(lyco.state_dict()))
    ours.multiplier = lyco.multiplier = multiplier
    x = _input(org)
    with torch.no_grad():
        want = lyco.get_diff_weight(multiplier=multiplier)[0]
        assert torch.allclose(ours.delta(), want, atol=1e-5)
        merged = lyco.get_merged_weight(multiplier=multiplier)[0]
        got = with_module(ours, org, x)
        expected = lyco(x) if part is None else merged_attention(org, part, merged, x)
        assert not torch.allclose(got, output(org, x), atol=1e-4)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("kind", ("linear", "conv3x3", "mha_v"))
def test_use_scalar_is_lycoris_in_and_out_of_files(kind):
    org, part, twin = twin_target(kind)
    # a file from a use_scalar LyCORIS module carries the scalar in a2/b2 (our a1/b1)
    lyco = _lyco(twin, use_scalar=True)
    randomise(lyco)
    with torch.no_grad():
        lyco.scalar.fill_(0.7)
    ours = GLoRA("lora_unet_x", org, DIM, DIM, part=part, use_scalar=True)
    ours.load_state_dict(_ours_from_lycoris(lyco.state_dict()))
    assert float(ours.scalar.detach()) == 1.0  # reset on load, as LyCORIS does
    with torch.no_grad():
        assert torch.allclose(ours.delta(), lyco.get_diff_weight()[0], atol=1e-5)
    # and ours writes it the same way: a plain LyCORIS module reading our file applies the same change
    randomise(ours, seed=2)
    with torch.no_grad():
        ours.scalar.fill_(0.3)
    plain = _lyco(twin)
    plain.load_state_dict({SWAP.get(k, k): v for k, v in ours.state_dict().items()})
    with torch.no_grad():
        assert torch.allclose(ours.delta(), plain.get_diff_weight()[0], atol=1e-5)


@pytest.mark.parametrize("use_scalar", [False, True], ids=["plain", "scalar"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_new_module_is_a_no_op_drawn_as_lycoris_draws_it(kind, use_scalar):
    org, part, _ = twin_target(kind)
    state = torch.random.get_rng_state()
    module = GLoRA("lora_unet_x", org, DIM, 1.0, torch.Generator().manual_seed(0), part=part, use_scalar=use_scalar)
    GLoRA("lora_unet_y", org, DIM, 1.0, part=part)  # no generator: a per-name one, never the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    assert module.scale == 1.0 and not module.delta().any()
    # LyCORIS 4.1.3: kaiming_uniform(a=sqrt(5)) on the up projections (its a1/b1, our a2/b2), zeros on
    # the down ones, which are kaiming too under use_scalar (the scalar is the zero then)
    random = ("a2", "b2", "a1", "b1") if use_scalar else ("a2", "b2")
    for key in ("a1", "a2", "b1", "b2"):
        w = getattr(module, key).weight
        if key in random:
            bound = 1 / math.sqrt(w[0].numel())
            assert w.abs().max() <= bound and w.std() > bound / 4, key
        else:
            assert not w.any(), key
    x = _input(org)
    with torch.no_grad():
        assert torch.allclose(with_module(module, org, x), output(org, x), atol=1e-6)  # the fused path rounds its own way


def test_unknown_options_and_dora_are_refused():
    org, _, _ = twin_target("conv3x3")
    # LyCORIS' use_tucker builds nothing for GLoRA (its condition never holds): not an option here
    with pytest.raises(TypeError, match="use_tucker"):
        GLoRA("lora_unet_x", org, DIM, 1.0, use_tucker=True)
    with pytest.raises(TypeError, match="GLoRA has no DoRA"):
        GLoRA("lora_unet_x", org, DIM, 1.0).enable_dora()


@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_our_own_file(kind):
    org, part, twin = twin_target(kind)
    lyco = _lyco(twin)
    randomise(lyco)
    weights = _ours_from_lycoris(lyco.state_dict())
    module = GLoRA.from_weights("lora_unet_x", org, weights, part=part)
    assert module.lora_dim == DIM
    module.load_state_dict(weights)
    with torch.no_grad():
        assert torch.allclose(module.delta(), lyco.get_diff_weight()[0], atol=1e-5)


def test_from_weights_names_the_module_and_key_of_a_bad_file():
    org, _, twin = twin_target("linear")
    good = _ours_from_lycoris(_lyco(twin).state_dict())
    with pytest.raises(KeyError, match=r"lora_unet_x\.b2\.weight: shape \(4, 4\) does not fit a Linear 8->6.$"):
        GLoRA.from_weights("lora_unet_x", org, good | {"b2.weight": torch.zeros(4, 4)})
    with pytest.raises(KeyError, match=r"lora_unet_x\.b1\.weight: missing"):
        GLoRA.from_weights("lora_unet_x", org, {k: v for k, v in good.items() if k != "b1.weight"})
    # LyCORIS 3+'s own names: refused, and said so
    with pytest.raises(KeyError, match=r"lora_unet_x\.a1\.weight: shape \(8, 4\) does not fit a Linear 8->6 \(LyCORIS 3\+ names"):
        GLoRA.from_weights("lora_unet_x", org, dict(_lyco(twin).state_dict()))
    conv, _, conv_twin = twin_target("conv3x3")
    with pytest.raises(KeyError, match=r"lora_unet_c\.a1\.weight: shape \(8, 4, 1, 1\) does not fit a Conv2d 8->6 with a 3x3 kernel \(LyCORIS 3\+"):
        GLoRA.from_weights("lora_unet_c", conv, dict(_lyco(conv_twin).state_dict()))
    with pytest.raises(KeyError, match=r"lora_unet_c\.b1\.weight: shape \(4, 8, 1, 1\) does not fit a Conv2d 8->6 with a 3x3 kernel.$"):
        ours = _ours_from_lycoris(_lyco(conv_twin).state_dict())
        GLoRA.from_weights("lora_unet_c", conv, ours | {"b1.weight": torch.zeros(4, 8, 1, 1)})


# -- A1111 v1.10's loader ------------------------------------------------------------------------------
a1111 = a1111_fixture("glora")  # its network.py and network_glora.py


@pytest.mark.parametrize("alpha", [DIM, 1.0], ids=["alpha=dim", "alpha=1"])
@pytest.mark.parametrize("kind", ("linear", "mha_q", "mha_k", "mha_v", "mha_out"))
def test_a1111_applies_the_same_change(a1111, kind, alpha):
    """A1111 reads our names, and ignores alpha (GLoRA has no dim there, so its scale is 1): so do we,
    also for a file whose alpha is not its rank."""
    org, part, _ = twin_target(kind)
    module = GLoRA("lora_unet_x", org, DIM, DIM, part=part)
    randomise(module)
    module.multiplier = 0.7
    file = module.state_dict() | {"alpha": torch.tensor(alpha)}
    loaded = GLoRA.from_weights("lora_unet_x", org, file, part=part)
    loaded.load_state_dict(file)
    loaded.multiplier = 0.7
    updown, ex_bias = a1111_updown(a1111, "GLora", org, part, file, 0.7)
    assert ex_bias is None
    with torch.no_grad():
        assert torch.allclose(updown, loaded.delta(), atol=1e-5)


@pytest.mark.parametrize("kind", ("linear", "conv1x1"))
def test_a1111_cannot_apply_a_lycoris_3_file_nor_a_conv_glora(a1111, kind):
    """Documents A1111 v1.10's gaps: LyCORIS 3+'s names do not multiply in its formula, and its
    4-d matmul does not apply conv GLoRA in any layout."""
    org, part, twin = twin_target(kind)
    lyco = _lyco(twin)
    randomise(lyco)
    files = [dict(lyco.state_dict())] + ([_ours_from_lycoris(lyco.state_dict())] if kind.startswith("conv") else [])
    for file in files:
        with pytest.raises(RuntimeError):
            a1111_updown(a1111, "GLora", org, part, file, 1.0)
