"""LoRA / LoCon modules on the real ldm model: hooking, exact removal, file format."""

import json
import math

import pytest
import safetensors.torch
import torch
from conftest import assert_same_as, snapshot

from lora_train.network.files import load_lora, payload_sha256, save_lora
from lora_train.tools.inspect import inspect_lora
from lora_train.network.network import LoRANetwork


@pytest.fixture
def inputs(tiny_adapter):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([5, 700])
    captions = ["zkz, a red circle", "a blue square"]
    return lat, t, captions


def forward(adapter, inputs):
    lat, t, captions = inputs
    with torch.no_grad():
        return adapter.predict(lat, t, adapter.encode_captions(captions))


def randomise_up(net, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.children():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)


def test_zero_up_leaves_outputs_unchanged_and_nonzero_changes_them(tiny_adapter, inputs):
    base = forward(tiny_adapter, inputs)
    net = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=4, alpha=1, conv_dim=4, conv_alpha=1)
    with net.applied():
        assert torch.equal(forward(tiny_adapter, inputs), base)
        randomise_up(net)
        changed = forward(tiny_adapter, inputs)
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(forward(tiny_adapter, inputs), base)


def test_text_encoder_lora_changes_conditioning(tiny_adapter):
    targets = [t for t in tiny_adapter.lora_targets() if t.name.startswith("lora_te_")]
    assert len(targets) == 12  # 2 layers x (q, k, v, out, fc1, fc2)
    with torch.no_grad():
        base = tiny_adapter.encode_captions(["zkz"])
    net = LoRANetwork(targets, dim=4, alpha=4)
    randomise_up(net)
    with net.applied(), torch.no_grad():
        assert (tiny_adapter.encode_captions(["zkz"]) - base).abs().max() > 1e-4


def test_apply_remove_is_exact_and_leaves_no_hooks(tiny_adapter, tiny_model, inputs):
    before = snapshot(tiny_model)
    net = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=4, alpha=1, conv_dim=4)
    randomise_up(net)
    net.apply()
    assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == len(net.lora_modules)
    forward(tiny_adapter, inputs)
    net.remove()
    assert_same_as(tiny_model, before)
    assert list(tiny_model.state_dict()) == list(before["state"])  # no LoRA keys in the host's state


def test_scale_is_alpha_over_dim(tiny_adapter):
    target = next(t for t in tiny_adapter.lora_targets() if t.name.endswith("attn1_to_q"))
    net = LoRANetwork([target], dim=8, alpha=2)
    m = net.lora_modules[target.name]
    randomise_up(net)
    x = torch.randn(3, target.module.in_features)
    expected = (x @ m.lora_down.weight.T @ m.lora_up.weight.T) * (2 / 8)
    with torch.no_grad():
        assert torch.allclose(m.forward_delta(x), expected, atol=1e-6)
        with net.applied():
            assert torch.allclose(target.module(x), torch.nn.functional.linear(x, target.module.weight, target.module.bias) + expected, atol=1e-6)


def test_init_like_sd_scripts(tiny_adapter):
    net = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=4, alpha=None, conv_dim=2, conv_alpha=1)
    for name, m in net.lora_modules.items():
        assert torch.count_nonzero(m.lora_up.weight) == 0
        fan_in = m.lora_down.weight[0].numel()
        assert m.lora_down.weight.abs().max() <= 1 / math.sqrt(fan_in)
        if m.lora_down.weight.dim() == 4 and m.lora_down.weight.shape[-1] == 3:
            assert m.lora_dim == 2 and float(m.alpha) == 1.0
            assert m.lora_up.weight.shape[2:] == (1, 1)
        else:
            assert m.lora_dim == 4 and float(m.alpha) == 4.0  # no alpha: alpha = dim


def test_locon_only_with_conv_dim(tiny_adapter):
    plain = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=4)
    assert not plain.is_locon  # 3x3 convs are skipped without conv_dim (sd-scripts)
    locon = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=4, conv_dim=4)
    assert locon.is_locon and len(locon.lora_modules) > len(plain.lora_modules)


def test_save_load_round_trip(tiny_adapter, tmp_path):
    net = LoRANetwork(tiny_adapter.lora_targets(conv=True), dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    randomise_up(net)
    metadata = {"ss_output_name": "x", "ss_network_dim": "4", "ss_tag_frequency": json.dumps({"1_a": {"zkz": 3}}), "note": "中文"}
    path = save_lora(tmp_path / "x.safetensors", net.kohya_state_dict(), metadata)
    tensors, md = load_lora(path)
    state = net.kohya_state_dict()
    assert tensors.keys() == state.keys()
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    for k, v in metadata.items():
        assert md[k] == v
    assert md["sshs_model_hash"] == payload_sha256(path.read_bytes())
    assert md["modelspec.hash_sha256"] == "0x" + md["sshs_model_hash"]
    assert not [p for p in tmp_path.iterdir() if p.name != "x.safetensors"]  # no temp file left

    rebuilt = LoRANetwork.from_state_dict(tensors, tiny_adapter.lora_targets(conv=True))
    again = rebuilt.kohya_state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_hash_ignores_user_metadata(tiny_adapter, tmp_path):
    net = LoRANetwork(tiny_adapter.lora_targets(), dim=2)
    a = load_lora(save_lora(tmp_path / "a.safetensors", net.kohya_state_dict(), {"ss_x": "1"}))[1]
    b = load_lora(save_lora(tmp_path / "b.safetensors", net.kohya_state_dict(), {"ss_x": "1", "user": "edited"}))[1]
    assert a["sshs_model_hash"] == b["sshs_model_hash"]


def test_failed_write_keeps_previous_file(tiny_adapter, tmp_path, monkeypatch):
    net = LoRANetwork(tiny_adapter.lora_targets(), dim=2)
    path = save_lora(tmp_path / "keep.safetensors", net.kohya_state_dict(), {"ss_a": "old"})
    good = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError):
        save_lora(path, net.kohya_state_dict(), {"ss_a": "new"})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_info_flags_bad_files(tiny_adapter, tmp_path):
    net = LoRANetwork(tiny_adapter.lora_targets(), dim=2)
    state = net.kohya_state_dict()
    good = save_lora(tmp_path / "good.safetensors", state, {"ss_base_model_version": "sd_v1"})
    assert inspect_lora(good)["valid"]
    name = next(iter(state)).split(".")[0]
    broken = dict(state)
    del broken[f"{name}.alpha"]
    broken["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 3)
    broken["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(3, 2)
    broken["lora_unet_not_a_module.alpha"] = torch.tensor(2.0)
    broken["something_else"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(broken, str(bad), {"ss_base_model_version": "sd_v1"})
    report = inspect_lora(bad)
    assert not report["valid"]
    text = "\n".join(report["problems"])
    assert f"{name}: alpha is missing" in text
    assert "lora_unet_not_a_module: not a module sd-scripts trains on sd15" in text
    assert "something_else: not a kohya LoRA key" in text
