"""Network algorithms: every module's delta() is the weight change it makes, and a file with keys of an
algorithm LoRA Train cannot load is refused with the key and the algorithm named."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_train.errors import UserError
from lora_train.network import fused
from lora_train.network.files import load_lora, save_lora
from lora_train.network.network import LoRANetwork
from lora_train.network.targets import Target

MULTIPLIER, DIM, ALPHA = 0.5, 4, 3.0  # alpha != dim: the scale is part of delta()
E, HEADS = 16, 4


def _kinds():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS)
    return {
        "linear": (nn.Linear(12, 10), None),
        "conv1x1": (nn.Conv2d(6, 8, 1), None),
        "conv3x3": (nn.Conv2d(6, 8, 3, stride=2, padding=1), None),
        **{f"mha_{part}": (mha, part) for part in fused.PARTS},
    }


KINDS = list(_kinds())


def _randomise(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _input(org: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(org, nn.Conv2d):
        return torch.randn(2, org.in_channels, 9, 9, generator=g)
    if isinstance(org, nn.MultiheadAttention):
        return torch.randn(5, 2, org.embed_dim, generator=g)  # (L, N, E)
    return torch.randn(3, 7, org.in_features, generator=g)


def _merged_output(org: nn.Module, part: str | None, delta: torch.Tensor, x: torch.Tensor, bias_delta=None) -> torch.Tensor:
    """The target's output with `delta` added to its weight (to the part's slice, for attention), and
    `bias_delta` to its bias (LyCORIS full's diff_b)."""
    if isinstance(org, nn.MultiheadAttention):
        merged = copy.deepcopy(org)
        with torch.no_grad():
            fused.part_weight(merged, part).add_(delta)
            if bias_delta is not None:
                bias = merged.out_proj.bias if part == "out" else merged.in_proj_bias.chunk(3)["qkv".index(part)]
                bias.add_(bias_delta)
        return merged(x, x, x, need_weights=False)[0]
    bias = org.bias if bias_delta is None else org.bias + bias_delta
    if isinstance(org, nn.Conv2d):
        return F.conv2d(x, org.weight + delta, bias, org.stride, org.padding, org.dilation, org.groups)
    return F.linear(x, org.weight + delta, bias)


def _output(org: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return org(x, x, x, need_weights=False)[0] if isinstance(org, nn.MultiheadAttention) else org(x)


def _check_delta(module, org, part):
    module.multiplier = MULTIPLIER
    x = _input(org)
    with torch.no_grad():
        delta = module.delta()
        want_shape = fused.part_weight(org, part).shape if part else org.weight.shape
        assert delta.shape == want_shape
        before = _output(org, x)
        module.attach(org)
        try:
            with_module = _output(org, x)
        finally:
            module.detach()
        assert not torch.allclose(with_module, before, atol=1e-4), "the module changes nothing: the check would be empty"
        bias_delta = module.bias_delta() if hasattr(module, "bias_delta") else None
        merged = _merged_output(org, part, delta, x, bias_delta)
    assert torch.allclose(with_module, merged, atol=1e-5), (with_module - merged).abs().max()
    if part is None:  # the difference of the outputs is the delta applied on its own
        own = F.conv2d(x, delta, bias_delta, org.stride, org.padding) if isinstance(org, nn.Conv2d) else F.linear(x, delta, bias_delta)
        assert torch.allclose(with_module - before, own, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_is_the_weight_change_of_each_trained_module(kind):
    """What LoRANetwork trains on each kind of target: LoRA on Linear / 1x1 / attention parts, LoCon on 3x3."""
    org, part = _kinds()[kind]
    target = Target(f"lora_unet_{kind}", org, kind, part)
    net = LoRANetwork([target], dim=DIM, alpha=ALPHA, conv_dim=DIM, conv_alpha=ALPHA)
    module = net.lora_modules[target.name]
    _randomise(module)
    _check_delta(module, org, part)


@pytest.mark.parametrize("kind", KINDS)
def test_every_registered_algorithm_delta_matches_its_forward(kind):
    from lora_train.network.algorithms import ALGORITHMS

    org, part = _kinds()[kind]
    trained_by = [cls for cls in ALGORITHMS if cls.accepts(org, part)]
    assert trained_by, f"no algorithm trains a {kind}"
    for cls in trained_by:
        dim = -1 if cls.algo == "boft" else DIM  # BOFT needs a power-of-two block count: -1 lets it choose
        module = cls(f"lora_unet_{kind}", org, dim, ALPHA, torch.Generator().manual_seed(0), part=part)
        _randomise(module)
        _check_delta(module, org, part)


def test_algorithms_split_the_targets_as_sd_scripts_does():
    from lora_train.network.locon import LoCon
    from lora_train.network.lora import LoRA, LoRAModule

    kinds = _kinds()
    net = LoRANetwork([Target(f"lora_unet_{k}", m, k, p) for k, (m, p) in kinds.items()], dim=2, conv_dim=2)
    got = {name.removeprefix("lora_unet_"): type(m) for name, m in net.lora_modules.items()}
    assert got == {k: (LoCon if k == "conv3x3" else LoRA) for k in kinds}
    assert net.is_locon and LoRAModule is LoRA
    with pytest.raises(TypeError, match="LoRA does not train a Conv2d with a 3x3 kernel"):
        LoRA("x", kinds["conv3x3"][0], 2, 1.0)


def test_training_forward_never_materialises_the_weight(monkeypatch):
    from lora_train.network.lora import LoRA

    def materialised(self):
        raise AssertionError("delta() called in the forward")

    monkeypatch.setattr(LoRA, "delta", materialised)
    org, part = _kinds()["linear"]
    net = LoRANetwork([Target("lora_unet_linear", org, "linear")], dim=DIM, alpha=ALPHA)
    net.train()
    with net.applied():
        org(_input(org)).sum().backward()
    assert net.lora_modules["lora_unet_linear"].lora_down.weight.grad is not None


# -- files with keys of other algorithms -----------------------------------------------------------
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def _lora_file_targets():
    torch.manual_seed(0)
    return [Target(Q, nn.Linear(8, 8), "q"), Target(K, nn.Linear(8, 8), "k")]


def _lora_state(targets):
    net = LoRANetwork(targets, dim=2, alpha=1.0)
    _randomise(net)
    return net.kohya_state_dict()


UNSUPPORTED = [
    # (keys replacing / added to the K module, what the message names)
    ({"oft_diag": (2, 4, 4)}, "OFT"),
    ({"lora_mid.weight": (2, 2, 3, 3)}, "Tucker/CP"),
    ({"scale": ()}, "scale"),
    ({"bm.weight": (2, 2)}, "GLoRA"),
]
OTHER_ALGORITHMS = [
    # (a module of another algorithm, shaped for the Linear(8, 8) target, and that algorithm)
    ({"dora_scale": (1, 8)}, "DoRA"),
    ({"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}, "LoHa"),
    ({"lokr_w1": (2, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)}, "LoKr"),
    ({"oft_blocks": (2, 4, 4)}, "Diag-OFT"),
    ({"diff": (8, 8), "diff_b": (8,)}, "Full"),
    ({"weight": (8,), "on_input": ()}, "IA3"),
    ({"a1.weight": (2, 8), "a2.weight": (8, 2), "b1.weight": (2, 8), "b2.weight": (8, 2)}, "GLoRA"),
]


@pytest.mark.parametrize("extra,algorithm", UNSUPPORTED, ids=[f"{f[1]}-{next(iter(f[0]))}" for f in UNSUPPORTED])
@pytest.mark.parametrize("alongside_lora", [True, False], ids=["with-lora-keys", "alone"])
def test_loading_keys_of_an_algorithm_it_cannot_load_names_key_and_algorithm(extra, algorithm, alongside_lora):
    targets = _lora_file_targets()
    state = _lora_state(targets)
    if not alongside_lora:
        state = {k: v for k, v in state.items() if not k.startswith(K)}
    state.update({f"{K}.{suffix}": torch.ones(shape) for suffix, shape in extra.items()})
    with pytest.raises(KeyError) as raised:
        LoRANetwork.from_state_dict(state, targets)
    message = str(raised.value)
    assert isinstance(raised.value, UserError)  # the CLI and UI print it without a traceback
    assert algorithm in message and "cannot load" in message, message
    named = message.split("'")[1]  # one of the module's foreign keys, in full
    assert named.startswith(f"{K}.") and named.removeprefix(f"{K}.") in extra, message


@pytest.mark.parametrize("extra,algorithm", OTHER_ALGORITHMS, ids=[f[1] for f in OTHER_ALGORITHMS])
def test_a_module_of_each_algorithm_loads_as_that_algorithm_and_two_in_one_module_are_refused(extra, algorithm):
    targets = _lora_file_targets()
    state = {k: v for k, v in _lora_state(targets).items() if not k.startswith(K)}
    g = torch.Generator().manual_seed(3)
    module_keys = {f"{K}.{suffix}": torch.randn(shape, generator=g) for suffix, shape in extra.items()}
    if algorithm == "DoRA":
        module_keys = {k.replace(K, Q): v.abs() + 0.5 for k, v in module_keys.items()}
        net = LoRANetwork.from_state_dict(_lora_state(targets) | module_keys, targets)
        assert net.lora_modules[Q].dora_scale is not None and torch.equal(net.lora_modules[Q].dora_scale, module_keys[f"{Q}.dora_scale"])
        return
    if algorithm == "IA3":
        module_keys[f"{K}.on_input"] = torch.tensor(0)
    net = LoRANetwork.from_state_dict(state | module_keys, targets)
    assert net.lora_modules[K].algorithm == algorithm and net.lora_modules[Q].algorithm == "LoRA"
    assert all(torch.equal(net.kohya_state_dict()[k].float(), v.float()) for k, v in module_keys.items())
    with pytest.raises(KeyError, match=rf"key '{K}\.[\w.]+' belongs to \S+, but {K} also has keys of \S+: one module holds one algorithm"):
        LoRANetwork.from_state_dict(_lora_state(targets) | module_keys, targets)


def test_a_dora_file_loads_after_a_round_trip_through_disk_and_renders_what_it_trained(tmp_path):
    targets = _lora_file_targets()
    net = LoRANetwork(targets, dim=2, alpha=1.0)
    for m in net.lora_modules.values():
        m.enable_dora(wd_on_out=False)
    _randomise(net)
    tensors, _ = load_lora(save_lora(tmp_path / "zkz.safetensors", net.kohya_state_dict(), {}))
    assert tensors[f"{Q}.dora_scale"].shape == (1, 8)
    rebuilt = LoRANetwork.from_state_dict(tensors, targets)
    for name, module in net.lora_modules.items():
        assert not rebuilt.lora_modules[name].wd_on_out
        assert torch.allclose(rebuilt.lora_modules[name].delta(), module.delta(), atol=1e-6)


def test_continuing_from_a_file_of_another_algorithm_is_refused():
    """network_weights loads non-strict (modules on one side only are skipped): a DoRA magnitude or a
    LoHa module where this network has a LoRA is not such a module, and skipping it would continue from
    something else than the file."""
    targets = _lora_file_targets()
    net = LoRANetwork(targets, dim=2, alpha=1.0)
    state = _lora_state(targets)
    net.load_kohya_state_dict({**state, "lora_te_unrelated_module.lora_down.weight": torch.zeros(2, 8)}, strict=False)
    with pytest.raises(KeyError, match=rf"{Q}\.dora_scale: the file's {Q} is not LoRA"):
        net.load_kohya_state_dict(state | {f"{Q}.dora_scale": torch.ones(1, 8)}, strict=False)


@pytest.mark.parametrize("key,what", [("something_else", "no network algorithm"),
                                      (f"{Q}.lora_magic", "no network algorithm"),
                                      ("bundle_emb.zkz.string_to_param.*", "textual-inversion embedding")])
def test_unknown_keys_are_named_too(key, what):
    targets = _lora_file_targets()
    with pytest.raises(KeyError, match=f"key '{key.replace('*', '[*]')}' belongs to (a bundled )?{what}"):
        LoRANetwork.from_state_dict(_lora_state(targets) | {key: torch.zeros(1)}, targets)


def test_plain_lora_and_locon_files_still_load_with_the_right_algorithm():
    from lora_train.network.locon import LoCon
    from lora_train.network.lora import LoRA

    kinds = _kinds()
    targets = [Target(f"lora_unet_{k}", m, k, p) for k, (m, p) in kinds.items()]
    state = _lora_state(targets[:1]) | LoRANetwork(targets[1:], dim=3, alpha=2.0, conv_dim=2, conv_alpha=1.0).kohya_state_dict()
    del state["lora_unet_linear.alpha"]  # no alpha: scale 1
    net = LoRANetwork.from_state_dict(state, targets)
    assert {n: type(m) for n, m in net.lora_modules.items()} == {t.name: (LoCon if t.name.endswith("conv3x3") else LoRA) for t in targets}
    assert net.lora_modules["lora_unet_linear"].scale == 1.0 and net.lora_modules["lora_unet_conv3x3"].lora_dim == 2
    with pytest.raises(KeyError, match=r"lora_up.weight missing \(LoRA needs lora_down.weight and lora_up.weight\)"):
        LoRANetwork.from_state_dict({k: v for k, v in state.items() if not k.startswith("lora_unet_linear.lora_up")}, targets)


@pytest.mark.parametrize("kind", KINDS)
def test_building_a_lora_never_draws_from_the_hosts_rng(kind):
    """torch's layer init would consume the global RNG the host samples with; ours draws from its own generator."""
    org, part = _kinds()[kind]
    state = torch.random.get_rng_state()
    LoRANetwork([Target(f"lora_unet_{kind}", org, kind, part)], dim=DIM, alpha=ALPHA, conv_dim=DIM, conv_alpha=ALPHA)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("wd_on_out", [False, True])
def test_dora_weight_scales_the_whole_change_as_the_loaders_do(wd_on_out):
    """<lora:name:0> is the base model in A1111 and ComfyUI, and 0.5 half the change, DoRA or not
    (LyCORIS' own module would still add the whole LoRA at weight 0)."""
    org, part = _kinds()["linear"]
    module = LoRANetwork([Target("lora_unet_linear", org, "linear")], dim=DIM, alpha=ALPHA).lora_modules["lora_unet_linear"]
    module.enable_dora(wd_on_out)
    _randomise(module)
    with torch.no_grad():
        module.multiplier = 1.0
        full = module.delta()
        module.multiplier = 0.5
        half = module.delta()
        module.multiplier = 0.0
        none = module.delta()
    assert full.abs().max() > 0.1 and torch.allclose(half, full / 2, atol=1e-6) and not none.any()


def test_dora_magnitudes_train_without_weight_decay():
    """AdamW's decay pulls a parameter towards 0; a DoRA magnitude starts at the base weight's norm,
    so decaying it would shrink the base under every prompt."""
    org, part = _kinds()["linear"]
    net = LoRANetwork([Target("lora_unet_linear", org, "linear")], dim=DIM, alpha=ALPHA)
    module = net.lora_modules["lora_unet_linear"]
    module.enable_dora(False)
    groups = net.param_groups(1e-3, 1e-4)
    magnitude = [g for g in groups if any(p is module.dora_scale for p in g["params"])]
    assert len(magnitude) == 1 and magnitude[0]["params"] == [module.dora_scale] and magnitude[0]["weight_decay"] == 0.0
    assert magnitude[0]["lr"] == 1e-3 and magnitude[0]["name"] == "unet"
    rest = [p for g in groups if g is not magnitude[0] for p in g["params"]]
    assert {id(p) for p in rest} == {id(module.lora_down.weight), id(module.lora_up.weight)}
    assert all("weight_decay" not in g for g in groups if g is not magnitude[0])
    before = module.dora_scale.detach().clone()
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.5)
    module.dora_scale.grad = torch.zeros_like(module.dora_scale)  # no gradient signal: only decay could move it
    module.lora_down.weight.grad = torch.zeros_like(module.lora_down.weight)
    module.lora_up.weight.grad = torch.zeros_like(module.lora_up.weight)
    optimizer.step()
    assert torch.equal(module.dora_scale, before)
