"""DyLoRA (`network/dylora.py`) against LyCORIS 4.1.3's DyLoraModule as the oracle, on a Linear, a 1x1
and a 3x3 Conv2d and each q/k/v/out part of a fused attention: the saved keys and shapes, the module
in eval mode being exactly the file's LoRA, and in training mode the same truncation, output and
gradients as LyCORIS for the same drawn block.

Forcing LyCORIS' block: its forward draws with Python's `random.randint(0, block_count - 1)` (module
`lycoris.modules.dylora` imports `random`). We replace that module's `random` with a stub whose
randint checks it is asked for (0, block_count - 1) and returns the block OUR module drew (read from
`last_rank`), so both run the same b; nothing of Python's global RNG is consumed or reseeded.

Where we differ from LyCORIS on purpose (module docstring): the training scale is alpha / r (r the
truncated rank) where LyCORIS uses alpha / (b + 1), b + 1 the number of blocks; equal for unit 1, a
factor `unit` apart otherwise, which the tests pin. And LyCORIS writes a conv's lora_up as (out, dim)
where we write sd-scripts' (and every LoRA's) (out, dim, 1, 1).
"""

import math
import random

import pytest
import torch
from torch import nn

import lycoris.modules.dylora as lyco_dylora
from lycoris.modules.dylora import DyLoraModule

from lora_train.model.checkpointing import checkpointed
from lora_train.network.dylora import DyLoRA
from lora_train.network.locon import LoCon
from lora_train.network.lora import LoRA

from network_oracle import KINDS, lyco_helpers, lyco_target, make_input, needs_lyco_helpers, randomise, targets

DIM, ALPHA = 4, 3.0  # alpha != dim, so every comparison includes the scale


def _target(kind):
    return targets()[kind]


def _input(org, seed=3):
    return make_input(org, seed, conv=(2, 5), seq=(3, 2), rows=(3, 2))  # (L, N, E) for an attention part, (.., in) for a Linear


def _pair(kind, unit, seed=1):
    """LyCORIS' module filled with seeded non-zero values, and ours with the same tensors (through its
    load_state_dict, which also takes LyCORIS' 2D conv lora_up)."""
    org, part = _target(kind)
    theirs = randomise(DyLoraModule("lora_te_x", lyco_target(org, part), 1.0, lora_dim=DIM, alpha=ALPHA, block_size=unit), seed)
    ours = DyLoRA("lora_te_x", org, DIM, ALPHA, part=part, unit=unit)
    ours.load_state_dict(theirs.state_dict())
    ours.dropout_generator = torch.Generator().manual_seed(seed + 7)
    return org, part, ours, theirs


class _ForcedRandint:
    """Stands in for `random` inside lycoris.modules.dylora: returns the block it is told to."""

    def __init__(self, blocks):
        self.blocks, self.block, self.calls = blocks, None, 0

    def randint(self, lo, hi):
        assert (lo, hi) == (0, self.blocks - 1)  # LyCORIS draws a block uniformly, as we do
        self.calls += 1
        return self.block


@pytest.fixture
def forced(monkeypatch):
    def force(blocks):
        stub = _ForcedRandint(blocks)
        monkeypatch.setattr(lyco_dylora, "random", stub)
        return stub

    return force


def _lyco_delta(theirs, x):
    """What LyCORIS' forward adds to its target's output."""
    return theirs(x) - theirs.org_forward(x)


# -- 1. keys and shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("unit", [1, 2, 4])
def test_state_dict_keys_and_shapes_are_lycoris(kind, unit):
    org, part = _target(kind)
    theirs = DyLoraModule("x", lyco_target(org, part), 1.0, lora_dim=DIM, alpha=ALPHA, block_size=unit).state_dict()
    ours = DyLoRA("x", org, DIM, ALPHA, part=part, unit=unit).state_dict()
    assert set(ours) == set(theirs) == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert ours["alpha"].shape == theirs["alpha"].shape == ()
    assert ours["lora_down.weight"].shape == theirs["lora_down.weight"].shape
    if isinstance(org, nn.Conv2d):
        # LyCORIS' custom_state_dict writes a conv's up as (out, dim); sd-scripts' DyLoRA, its LoRA
        # and ours write (out, dim, 1, 1), the shape networks.lora (and our LoRA/LoCon) load
        assert theirs["lora_up.weight"].shape == (6, DIM)
        assert ours["lora_up.weight"].shape == (6, DIM, 1, 1)
    else:
        assert ours["lora_up.weight"].shape == theirs["lora_up.weight"].shape
    kernel = (3, 3) if kind == "conv3x3" else (1, 1) if kind == "conv1x1" else ()
    width = 6 if part is None else 8
    assert ours["lora_down.weight"].shape == (DIM, 8, *kernel)
    assert ours["lora_up.weight"].shape[:2] == (width, DIM)


def test_blocks_are_parameters_and_state_dict_round_trips():
    org, part, ours, theirs = _pair("conv3x3", 2)
    assert [n for n, _ in ours.named_parameters()] == ["down_0", "up_0", "down_1", "up_1"]
    assert ours.down_0.shape == (2, 8, 3, 3) and ours.up_1.shape == (6, 2, 1, 1)
    sd = theirs.state_dict()
    assert torch.equal(ours.state_dict()["lora_down.weight"], sd["lora_down.weight"])
    assert torch.equal(ours.state_dict()["lora_up.weight"].flatten(1), sd["lora_up.weight"])
    again = DyLoRA("x", org, DIM, 1.0, unit=2)
    assert not again.load_state_dict(ours.state_dict()).missing_keys
    assert again.alpha_value == ALPHA and torch.equal(again.up_1, ours.up_1)
    missing = again.load_state_dict({"alpha": torch.tensor(2.0)}, strict=False).missing_keys
    assert sorted(missing) == ["lora_down.weight", "lora_up.weight"]
    with pytest.raises(RuntimeError, match=r"size mismatch for lora_up.weight"):
        again.load_state_dict({**ours.state_dict(), "lora_up.weight": torch.zeros(6, 3, 1, 1)})


# -- 2. eval mode: the file's LoRA -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_eval_is_the_plain_lora_with_the_same_weights(kind, multiplier):
    org, part, ours, theirs = _pair(kind, 2)
    ours.eval()
    plain_class = LoCon if kind == "conv3x3" else LoRA
    plain = plain_class("lora_te_x", org, DIM, ALPHA, part=part)
    plain.load_state_dict(ours.state_dict())
    ours.multiplier = plain.multiplier = multiplier
    x = _input(org)
    state = ours.dropout_generator.get_state()
    assert torch.allclose(ours.delta(), plain.delta(), atol=1e-6)
    assert torch.allclose(ours.forward_delta(x), plain.forward_delta(x), atol=1e-5)
    assert torch.equal(ours.dropout_generator.get_state(), state)  # no block drawn in eval
    assert ours.scale == ALPHA / DIM
    # the same through the host: a hooked target, or the fused attention with this part
    ours.attach(org)
    try:
        with_ours = org(x, x, x)[0] if part else org(x)
    finally:
        ours.detach()
    plain.attach(org)
    try:
        with_plain = org(x, x, x)[0] if part else org(x)
    finally:
        plain.detach()
    assert torch.allclose(with_ours, with_plain, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_eval_full_rank_is_lycoris_last_block_at_unit_1(kind, forced):
    """With unit 1, LyCORIS' largest draw (b = dim - 1: all ranks, scale alpha / dim) is the file's
    LoRA, which is what we use in eval."""
    org, part, ours, theirs = _pair(kind, 1)
    ours.eval()
    stub = forced(DIM)
    stub.block = DIM - 1
    x = _input(org)
    assert torch.allclose(ours.forward_delta(x), _lyco_delta(theirs, x), atol=1e-5)
    assert torch.allclose(ours.delta(), theirs.get_diff_weight(rank=DIM - 1)[0], atol=1e-6)


def test_lycoris_draws_a_block_in_eval_mode_too(forced):
    """A difference we do not copy: LyCORIS' forward (and sd-scripts') draws a block on every call,
    in eval too, so samples taken while training are of a random rank. Ours uses all ranks."""
    org, part, ours, theirs = _pair("linear", 2)
    theirs.eval()
    stub = forced(DIM // 2)
    stub.block = 0
    x = _input(org)
    theirs(x)
    assert stub.calls == 1


# -- 3. training mode: LyCORIS' truncation for the same block ---------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("unit", [1, 2])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_training_forward_and_gradients_are_lycoris_for_the_drawn_block(kind, unit, multiplier, forced):
    org, part, ours, theirs = _pair(kind, unit)
    ours.train(), theirs.train()
    ours.multiplier = theirs.multiplier = multiplier
    blocks = DIM // unit
    stub = forced(blocks)
    x = _input(org)
    seen = set()
    for _ in range(30):  # until every block was drawn once (a few steps with these seeds)
        if seen == set(range(blocks)):
            break
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
        mine = ours.forward_delta(x)
        b = ours.last_rank // unit - 1
        seen.add(b)
        stub.block = b
        lyco = _lyco_delta(theirs, x)
        # LyCORIS scales by alpha / (b + 1) (blocks), we by alpha / ((b + 1) * unit) (ranks)
        assert torch.allclose(lyco, mine * unit, atol=1e-5)
        mine.sum().backward()
        lyco.sum().backward()
        for i in range(blocks):
            for ours_p, theirs_p in ((getattr(ours, f"down_{i}"), theirs.down_list[i]), (getattr(ours, f"up_{i}"), theirs.up_list[i])):
                if i == b:  # only the drawn block is trained, in both
                    assert ours_p.grad is not None and theirs_p.grad is not None
                    # (LyCORIS keeps a conv's blocks flat: (unit, in * kh * kw), (out, unit))
                    assert torch.allclose(theirs_p.grad, (ours_p.grad * unit).reshape(theirs_p.shape), atol=1e-4)
                    assert ours_p.grad.abs().sum() > 0
                else:  # below it detached, above it cut: no gradient at all (not a zero one)
                    assert ours_p.grad is None and theirs_p.grad is None
    assert seen == set(range(blocks))  # every block was drawn and compared


def test_training_output_is_the_truncated_file_lora():
    """Trained at rank r is what the rank-r LoRA cut from the file does (alpha kept, rank r: sd-scripts'
    extract_lora_from_dylora.py), checked here with a plain LoRA of rank r."""
    org, part, ours, _ = _pair("conv3x3", 2)
    ours.train()
    x = _input(org)
    mine = ours.forward_delta(x)
    r = ours.last_rank
    sd = ours.state_dict()
    cut = LoCon("lora_te_x", org, r, ALPHA)
    cut.load_state_dict({"alpha": sd["alpha"], "lora_down.weight": sd["lora_down.weight"][:r],
                         "lora_up.weight": sd["lora_up.weight"][:, :r]})
    assert torch.allclose(mine, cut.forward_delta(x), atol=1e-5)


def test_draws_are_uniform_from_the_module_generator():
    org, part, ours, _ = _pair("linear", 1)
    ours.train()
    ours.dropout_generator = torch.Generator().manual_seed(5)
    x = _input(org)
    counts = [0] * DIM
    for _ in range(400):
        ours.forward_delta(x)
        counts[ours.last_rank - 1] += 1
    assert all(70 <= c <= 130 for c in counts), counts
    # the same generator state draws the same blocks (what checkpoint recompute relies on)
    g = ours.dropout_generator
    state = g.get_state()
    first = [(ours.forward_delta(x), ours.last_rank)[1] for _ in range(5)]
    g.set_state(state)
    assert [(ours.forward_delta(x), ours.last_rank)[1] for _ in range(5)] == first


def test_gradient_checkpointing_recomputes_the_same_block():
    """The loop's checkpointing replays the network's dropout generator on recompute
    (model/checkpointing.py): the recomputed forward must draw the block the forward drew."""
    def run(checkpoint):
        torch.manual_seed(0)
        block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
        module = DyLoRA("m", block[1], DIM, ALPHA, torch.Generator().manual_seed(1), unit=1)
        with torch.no_grad():
            for i in range(DIM):
                getattr(module, f"up_{i}").normal_(generator=torch.Generator().manual_seed(10 + i))
        module.dropout_generator = torch.Generator().manual_seed(2)
        module.attach(block[1])
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
        ranks = []
        for _ in range(4):
            if checkpoint:
                with checkpointed([block], module.dropout_generator):
                    y = block(x)
            else:
                y = block(x)
            ranks.append(module.last_rank)
            y.square().sum().backward()
        module.detach()
        return ranks, [p.grad for p in module.parameters()]

    plain_ranks, plain_grads = run(False)
    ck_ranks, ck_grads = run(True)
    assert plain_ranks == ck_ranks
    for a, b in zip(plain_grads, ck_grads):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "mha_v"])
def test_module_dropout_skips_without_drawing_a_block(kind):
    org, part, ours, _ = _pair(kind, 2)
    ours.train()
    ours.module_dropout = 1.0
    ours.last_rank = None
    assert ours.forward_delta(_input(org)) is None and ours.last_rank is None
    ours.eval()  # module dropout is for training only
    assert ours.forward_delta(_input(org)) is not None


# -- 4. the global RNG, a new module -----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_new_module_is_a_no_op_and_leaves_the_global_rngs(kind):
    org, part = _target(kind)
    torch_state, py_state = torch.random.get_rng_state(), random.getstate()
    m = DyLoRA("m", org, DIM, ALPHA, torch.Generator().manual_seed(0), part=part, unit=2)
    m.train()
    x = _input(org)
    for _ in range(3):
        m.forward_delta(x).sum().backward()
    m.dropout_generator = None  # a module used on its own gets a generator of its own
    m.module_dropout = 0.5
    for _ in range(3):
        m.forward_delta(x)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    fresh = DyLoRA("m", org, DIM, ALPHA, torch.Generator().manual_seed(0), part=part, unit=2)
    assert torch.count_nonzero(fresh.delta()) == 0
    fresh.train()
    assert torch.count_nonzero(fresh.forward_delta(x)) == 0


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "mha_q"])
def test_initial_values_are_a_loras_from_the_same_generator(kind):
    """LyCORIS and sd-scripts both init down with kaiming_uniform(a=sqrt(5)) per block/row (fan_in =
    in * kh * kw, the whole down's) and up with zeros: LoRA's init, so the same draws as a LoRA."""
    org, part = _target(kind)
    ours = DyLoRA("m", org, DIM, ALPHA, torch.Generator().manual_seed(4), part=part, unit=2).state_dict()
    plain_class = LoCon if kind == "conv3x3" else LoRA
    plain = plain_class("m", org, DIM, ALPHA, torch.Generator().manual_seed(4), part=part).state_dict()
    assert torch.equal(ours["lora_down.weight"], plain["lora_down.weight"])
    assert torch.count_nonzero(ours["lora_up.weight"]) == 0
    fan_in = ours["lora_down.weight"][0].numel()
    assert ours["lora_down.weight"].abs().max() <= 1 / math.sqrt(fan_in)


# -- 5. files and options ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_from_weights_rebuilds_lycoris_shapes(kind):
    org, part, ours, theirs = _pair(kind, 2)
    weights = theirs.state_dict()
    rebuilt = DyLoRA.from_weights("lora_te_x", org, weights, part=part, unit=2)
    rebuilt.load_state_dict(weights)
    rebuilt.eval(), ours.eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert torch.allclose(rebuilt.delta(), ours.delta())


def test_from_weights_names_the_module_and_key():
    org = nn.Linear(8, 6)
    good = DyLoRA("m", org, DIM, ALPHA).state_dict()
    with pytest.raises(KeyError, match=r"m\.lora_down\.weight: shape \(4, 9\) does not fit a Linear 8->6"):
        DyLoRA.from_weights("m", org, {**good, "lora_down.weight": torch.zeros(4, 9)})
    with pytest.raises(KeyError, match=r"m\.lora_up\.weight: shape \(6, 3\)"):
        DyLoRA.from_weights("m", org, {**good, "lora_up.weight": torch.zeros(6, 3)})
    with pytest.raises(KeyError, match=r"m\.lora_up\.weight: missing"):
        DyLoRA.from_weights("m", org, {"lora_down.weight": good["lora_down.weight"]})
    conv = nn.Conv2d(8, 6, 3, padding=1)
    with pytest.raises(KeyError, match=r"c\.lora_down\.weight: shape \(4, 8, 1, 1\) does not fit a Conv2d 8->6 with a 3x3 kernel"):
        DyLoRA.from_weights("c", conv, {"lora_down.weight": torch.zeros(4, 8, 1, 1), "lora_up.weight": torch.zeros(6, 4)})


@pytest.mark.parametrize("kind", KINDS)
def test_our_file_loads_as_lora_or_locon(kind):
    """The file is a LoRA: the loading side (LoRA, LoCon) rebuilds it and renders what eval renders."""
    org, part, ours, _ = _pair(kind, 2)
    ours.eval()
    sd = ours.state_dict()
    plain_class = LoCon if kind == "conv3x3" else LoRA
    loaded = plain_class.from_weights("lora_te_x", org, sd, part=part)
    loaded.load_state_dict(sd)
    assert torch.allclose(loaded.delta(), ours.delta(), atol=1e-6)
    assert not DyLoRA.claims(set(sd))


def test_claims_accepts_and_options():
    assert not DyLoRA.claims({"lora_down.weight", "lora_up.weight", "alpha"})
    assert DyLoRA.algorithm == "DyLoRA" and DyLoRA.algo == "dylora"
    for org in (nn.Linear(8, 6), nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3)):
        assert DyLoRA.accepts(org)
    assert DyLoRA.accepts(nn.MultiheadAttention(8, 2), "k")
    assert not DyLoRA.accepts(nn.LayerNorm(8)) and not DyLoRA.accepts(nn.Conv1d(8, 6, 3))
    with pytest.raises(TypeError, match="block_size"):
        DyLoRA("m", nn.Linear(8, 6), DIM, ALPHA, block_size=2)
    with pytest.raises(ValueError, match="multiple of unit 3"):
        DyLoRA("m", nn.Linear(8, 6), DIM, ALPHA, unit=3)
    with pytest.raises(TypeError, match="no DoRA"):
        DyLoRA("m", nn.Linear(8, 6), DIM, ALPHA).enable_dora()
    m = DyLoRA("m", nn.Linear(8, 6), 8, 8, unit=4)
    assert m.unit == 4 and m.blocks == 2 and m.scale == 1.0
    for bad in (0, 2, 12):
        with pytest.raises(ValueError, match="multiples of 4 up to 8"):
            m.weight_delta(rank=bad)


# -- 6. the A1111 loader -------------------------------------------------------------------------------
# network_lora.py imports the WebUI's `modules.*` and cannot be imported here; its math for a LoRA is
# lyco_helpers.rebuild_conventional(up, down, shape) times alpha / dim (torch only), which we import.
@needs_lyco_helpers
@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "mha_out"])
def test_a1111_helpers_read_our_file(kind):
    helpers = lyco_helpers()
    org, part, ours, _ = _pair(kind, 2)
    ours.eval()
    w = ours.state_dict()
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    shape = [up.size(0), down.size(1), *down.shape[2:]]
    updown = helpers.rebuild_conventional(up, down, shape) * float(w["alpha"]) / down.shape[0]
    assert torch.allclose(ours.weight_delta(), updown.reshape(ours.target_shape), atol=1e-6)
    # its `dyn=r` cuts the ranks but keeps alpha / dim; we train rank r at alpha / r
    r = 2
    cut = helpers.rebuild_conventional(up, down, shape, dyn_dim=r) * float(w["alpha"]) / down.shape[0]
    assert torch.allclose(ours.weight_delta(rank=r) * r / DIM, cut.reshape(ours.target_shape), atol=1e-6)
