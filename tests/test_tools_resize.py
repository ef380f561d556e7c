"""`resize`: every module of the new file is the best rank-N approximation of the old one's delta
(Eckart-Young: its error is the SVD tail, computed here with torch.linalg.svdvals on up @ down *
alpha / rank built by hand from the file's tensors), the dynamic methods pick the rank sd-scripts'
rules give on a module with known singular values, and the input is never written."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lora_train.cli import main
from lora_train.errors import UserError
from lora_train.network.files import load_lora, save_lora
from lora_train.network.network import LoRANetwork
from lora_train.tools.resize import resize

NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _delta(tensors: dict, name: str) -> torch.Tensor:
    """A LoRA module's weight change, from its file tensors: up @ down (flattened) * alpha / rank."""
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    rank = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
    return up.reshape(up.shape[0], rank) @ down.reshape(rank, -1) * (alpha / rank)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_model):
    """A LoCon of rank 8 (alpha 4, conv alpha 2) on the tiny model, with every up factor non-zero."""
    from lora_train.model.ldm import LdmAdapter

    net = LoRANetwork(LdmAdapter(tiny_model, name="tiny").lora_targets(conv=True), dim=8, alpha=4, conv_dim=8, conv_alpha=2, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.lora_modules.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("resize") / "in.safetensors"
    save_lora(path, net.kohya_state_dict(), {"ss_base_model_version": "sd_v1", "ss_network_dim": "8", "ss_network_alpha": "4",
                                              "ss_training_comment": "mine"})
    return path


def test_each_module_is_the_best_rank_n_approximation(lora_file, tmp_path):
    before = _sha(lora_file)
    out = tmp_path / "out.safetensors"
    result = resize(lora_file, out, 3, conv_rank=2)
    old, _ = load_lora(lora_file)
    new, metadata = load_lora(out)
    names = sorted({k.split(".")[0] for k in old})
    assert sorted({k.split(".")[0] for k in new}) == names and len(result.modules) == len(names)
    convs = 0
    for name in names:
        d = _delta(old, name)
        n = 2 if old[f"{name}.lora_down.weight"].dim() == 4 and old[f"{name}.lora_down.weight"].shape[2:] != (1, 1) else 3
        convs += n == 2
        assert new[f"{name}.lora_down.weight"].shape[0] == n
        s = torch.linalg.svdvals(d)
        tail = float(s[n:].pow(2).sum().sqrt())
        error = float(torch.linalg.matrix_norm(d - _delta(new, name)))
        assert abs(error - tail) <= 0.01 * tail, (name, error, tail)
        # the scale is kept: alpha' = (alpha / rank) * rank'
        assert float(new[f"{name}.alpha"]) == pytest.approx((4 / 8 if n == 3 else 2 / 8) * n)
    assert convs > 0
    assert _sha(lora_file) == before
    assert metadata["ss_network_dim"] == "3" and metadata["ss_network_alpha"] == "1.5"
    assert metadata["ss_training_comment"] == "dimension is resized from 8 to 3 (conv: 2); mine"
    card = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert card["notes"].startswith("resized from in.safetensors to rank 3")


def _known_module(tmp_path, singular_values: list[float]):
    """One 16x16 LoRA module of rank 8 whose delta has exactly `singular_values` (alpha = rank: scale 1)."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    s = torch.tensor(singular_values, dtype=torch.float64)
    tensors = {f"{NAME}.lora_up.weight": (q1[:, :8] * s).float(), f"{NAME}.lora_down.weight": q2[:, :8].T.contiguous().float(),
               f"{NAME}.alpha": torch.tensor(8.0)}
    path = tmp_path / "known.safetensors"
    save_lora(path, tensors, {"ss_network_dim": "8"})
    return path


# S = 8, 4, 2, 1, 1/2, 1/4, 1/8, 1/16. sd-scripts' rules count k, clamp it to 1..len(S)-1, keep k + 1:
# sv_ratio 5: S > 8/5 = 1.6 -> 8, 4, 2: k = 3, rank 4.
# sv_cumulative 0.9: running sums / 15.9375 = .502 .753 .878 .941: first >= .9 at index 3, k = 4, rank 5.
# sv_fro 0.95: running sums of S^2 / 85.33 = .750 .9375: first >= .95^2 = .9025 at index 1, k = 2, rank 3.
@pytest.mark.parametrize("method, param, cap, expected", [
    ("sv_ratio", 5, 8, 4), ("sv_cumulative", 0.9, 8, 5), ("sv_fro", 0.95, 8, 3), ("sv_cumulative", 0.9, 3, 3), ("sv_ratio", 1000, 8, 8)])
def test_dynamic_methods_pick_sd_scripts_rank(tmp_path, method, param, cap, expected):
    src = _known_module(tmp_path, [8, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    result = resize(src, tmp_path / "out.safetensors", cap, dynamic=method, param=param)
    new, metadata = load_lora(tmp_path / "out.safetensors")
    assert new[f"{NAME}.lora_down.weight"].shape[0] == expected == result.modules[0].rank
    assert float(new[f"{NAME}.alpha"]) == pytest.approx(expected)  # scale 1 kept
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"].startswith(f"Dynamic resize with {method}: {float(param)} from 8; ")
    # what the kept rank retains, as sd-scripts prints it
    s = torch.tensor([8, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    assert result.modules[0].fro_retained == pytest.approx(float(s[:expected].norm() / s.norm()), rel=1e-5)
    assert result.modules[0].sum_retained == pytest.approx(float(s[:expected].sum() / s.sum()), rel=1e-5)
    assert result.modules[0].max_ratio == pytest.approx(8 / float(s[expected - 1]), rel=1e-4)


def test_cli_prints_retained_energy_per_module(lora_file, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["resize", str(lora_file), str(out), "--rank", "2", "--dynamic", "sv_fro", "--param", "0.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    module_lines = [line for line in lines if "| sum(S) retained:" in line]
    assert len(module_lines) == len({k.split(".")[0] for k in load_lora(lora_file)[0]})
    assert all(", dynamic | dim: " in line for line in module_lines)
    assert any(line.startswith("Average Frobenius norm retention: ") for line in lines)


def test_inputs_are_never_overwritten_and_bad_options_are_one_line(lora_file, tmp_path):
    with pytest.raises(UserError, match="is an input file; inputs are never overwritten"):
        resize(lora_file, lora_file, 2)
    with pytest.raises(UserError, match="needs --param"):
        resize(lora_file, tmp_path / "x.safetensors", 2, dynamic="sv_ratio")
    with pytest.raises(UserError, match="the output must be a .safetensors file"):
        resize(lora_file, tmp_path / "x.pt", 2)


def test_a_loha_becomes_a_lora_of_its_best_rank_n_delta(tmp_path, tiny_adapter):
    from lora_train.network.kind import NetworkKind

    net = LoRANetwork(tiny_adapter.lora_targets(), dim=4, alpha=2, seed=3, kind=NetworkKind(module="lycoris.kohya", algo="loha"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    src = tmp_path / "loha.safetensors"
    save_lora(src, net.kohya_state_dict(), {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya",
                                            "ss_network_args": json.dumps({"algo": "loha"})})
    out = tmp_path / "lora.safetensors"
    result = resize(src, out, 3, model="builtin:tiny")
    assert result.notes and "LoHa" in result.notes[-1]
    old, _ = load_lora(src)
    new, metadata = load_lora(out)
    assert metadata["ss_network_module"] == "networks.lora" and json.loads(metadata["ss_network_args"]) == {}
    for name in sorted({k.split(".")[0] for k in old})[:20]:
        o = {k.split(".", 1)[1]: v.double() for k, v in old.items() if k.startswith(name + ".")}
        # LoHa's delta by hand: (w1a @ w1b) * (w2a @ w2b) * alpha / rank
        d = (o["hada_w1_a"] @ o["hada_w1_b"]) * (o["hada_w2_a"] @ o["hada_w2_b"]) * (float(o["alpha"]) / o["hada_w1_b"].shape[0])
        d = d.reshape(d.shape[0], -1)
        tail = float(torch.linalg.svdvals(d)[3:].pow(2).sum().sqrt())
        assert abs(float(torch.linalg.matrix_norm(d - _delta(new, name))) - tail) <= 0.01 * tail, name
