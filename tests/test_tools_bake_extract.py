"""`bake` and `extract` on the tiny model saved as a checkpoint file: a baked checkpoint encodes text
and predicts noise as the LoRA hooked on the original model does, keeps the original's keys and
dtypes and leaves it untouched; `extract(base, bake(base, L))` gives back L's deltas at L's rank."""

from __future__ import annotations

import hashlib

import pytest
import safetensors.torch
import torch

from lora_train.cli import main
from lora_train.errors import UserError
from lora_train.model import registry, tiny
from lora_train.model.loading import instantiate, quiet
from lora_train.network.files import load_lora, save_lora
from lora_train.network.network import LoRANetwork, network_from_file
from lora_train.tools.bake import bake, parse_lora_weight
from lora_train.tools.extract import extract

PROMPTS = ["a photo of a cat", "zkz, a red house"]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_lora(adapter, path, seed: int, conv: bool = True, **kw):
    net = LoRANetwork(adapter.lora_targets(conv=conv), dim=4, alpha=2, conv_dim=4 if conv else None, conv_alpha=1, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in net.lora_modules.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    save_lora(path, net.kohya_state_dict(), {"ss_base_model_version": adapter.info.base_model_version})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bake")
    with quiet():
        base = tiny.save_checkpoint(tiny.build_tiny(0), folder / "base.safetensors")
    adapter = registry.load_adapter(str(base))
    return folder, base, adapter, _random_lora(adapter, folder / "l.safetensors", 1)


def _outputs(adapter, nets=()):
    """Text encoding and a UNet prediction (SD1: the conditioning is the encoding)."""
    for net in nets:
        net.apply()
    try:
        with torch.no_grad():
            text = adapter.encode_captions(PROMPTS)
            g = torch.Generator().manual_seed(0)
            latents = torch.randn(2, 4, 8, 8, generator=g)
            noise = adapter.predict(latents, torch.tensor([10, 700]), adapter.condition(text, None))
    finally:
        for net in nets:
            net.remove()
    return text, noise


def test_baked_checkpoint_forward_equals_the_hooked_network(files, tmp_path):
    folder, base, adapter, lora = files
    before = _sha(base)
    out = tmp_path / "baked.safetensors"
    result = bake(base, [(str(lora), 0.7)], out, adapter=adapter)
    assert _sha(base) == before
    net = network_from_file(lora, adapter.file_targets())
    net.set_multiplier(0.7)
    want_text, want_noise = _outputs(adapter, [net])
    plain_text, plain_noise = _outputs(adapter)
    baked = registry.load_adapter(str(out))
    text, noise = _outputs(baked)
    assert not torch.allclose(want_noise, plain_noise, atol=1e-3) and not torch.allclose(want_text, plain_text, atol=1e-3)
    torch.testing.assert_close(text, want_text, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(noise, want_noise, atol=1e-4, rtol=1e-4)
    original, new = safetensors.torch.load_file(str(base)), safetensors.torch.load_file(str(out))
    assert list(new) == list(original) and all(new[k].dtype == original[k].dtype for k in original)
    assert result.tensors == len(net.lora_modules)
    assert out.with_suffix(".yaml").read_text() == base.with_suffix(".yaml").read_text()


def test_two_loras_and_half_precision_keep_dtypes(files, tmp_path):
    folder, base, adapter, lora = files
    state = safetensors.torch.load_file(str(base))
    half = tmp_path / "half.safetensors"
    safetensors.torch.save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(half))
    half.with_suffix(".yaml").write_text(base.with_suffix(".yaml").read_text())
    other = _random_lora(adapter, tmp_path / "m.safetensors", 7, conv=False)
    out = tmp_path / "two.safetensors"
    assert main(["bake", str(half), f"{lora}:0.5", f"{other}:-1", "--output", str(out)]) == 0
    new = safetensors.torch.load_file(str(out))
    assert all(v.dtype == torch.float16 for v in new.values() if v.is_floating_point())
    a, b = network_from_file(lora, adapter.file_targets()), network_from_file(other, adapter.file_targets())
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
    with torch.no_grad():
        want = state[key].half().float() + 0.5 * a.lora_modules[name].delta() - b.lora_modules[name].delta()
    torch.testing.assert_close(new[key].float(), want.half().float(), atol=0, rtol=0)


def test_bake_refuses_to_overwrite_an_input(files):
    folder, base, adapter, lora = files
    with pytest.raises(UserError, match="inputs are never overwritten"):
        bake(base, [(str(lora), 1.0)], base, adapter=adapter)
    with pytest.raises(UserError, match="inputs are never overwritten"):
        bake(base, [(str(lora), 1.0)], lora, adapter=adapter)
    assert parse_lora_weight("C:\\x\\a.safetensors") == ("C:\\x\\a.safetensors", 1.0)
    assert parse_lora_weight("a.safetensors:-0.5") == ("a.safetensors", -0.5)


def test_extract_of_a_bake_recovers_the_loras_deltas(files, tmp_path):
    folder, base, adapter, lora = files
    baked = bake(base, [(str(lora), 1.0)], tmp_path / "baked.safetensors", adapter=adapter).path
    out = tmp_path / "extracted.safetensors"
    result = extract(base, baked, 4, out, conv_rank=4, clamp_quantile=1, adapter=adapter)
    assert result.text_encoder
    old, _ = load_lora(lora)
    new, metadata = load_lora(out)
    names = sorted({k.split(".")[0] for k in old})
    assert sorted({k.split(".")[0] for k in new}) == names
    for name in names:
        deltas = []
        for t in (old, new):
            down, up = t[f"{name}.lora_down.weight"].double(), t[f"{name}.lora_up.weight"].double()
            deltas.append(up.flatten(1) @ down.flatten(1) * float(t[f"{name}.alpha"]) / down.shape[0])
        assert new[f"{name}.lora_down.weight"].shape == old[f"{name}.lora_down.weight"].shape
        assert float((deltas[1] - deltas[0]).norm()) <= 1e-3 * float(deltas[0].norm()), name
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"], metadata["ss_base_model_version"]) == ("4", "4.0", "sd_v1")
    assert out.with_suffix(".json").is_file()


def test_extract_clamps_and_leaves_out_an_unchanged_text_encoder(files, tmp_path):
    folder, base, adapter, lora = files
    unet_only = tmp_path / "u.safetensors"
    net = network_from_file(lora, adapter.file_targets())
    state = {k: v for k, v in load_lora(lora)[0].items() if k.startswith("lora_unet_")}
    save_lora(unet_only, state, {})
    baked = bake(base, [(str(unet_only), 1.0)], tmp_path / "b.safetensors", adapter=adapter).path
    out, raw = tmp_path / "e.safetensors", tmp_path / "raw.safetensors"
    result = extract(base, baked, 4, out, adapter=adapter)  # sd-scripts' defaults: quantile 0.99, no convs
    extract(base, baked, 4, raw, clamp_quantile=1, adapter=adapter)
    assert not result.text_encoder and result.notes
    new, unclamped = load_lora(out)[0], load_lora(raw)[0]
    assert new and all(k.startswith("lora_unet_") for k in new)
    assert not any(k.startswith(n) for n, m in net.lora_modules.items() if m.algorithm == "LoCon" for k in new)
    cut = 0
    for name in {k.split(".")[0] for k in new}:
        # sd-scripts: both factors clamped to +-(the 0.99 quantile of their values together)
        values = torch.cat([unclamped[f"{name}.lora_up.weight"].flatten(), unclamped[f"{name}.lora_down.weight"].flatten()])
        hi = float(torch.quantile(values, 0.99))
        for part in ("lora_up.weight", "lora_down.weight"):
            torch.testing.assert_close(new[f"{name}.{part}"], unclamped[f"{name}.{part}"].clamp(-hi, hi))
        cut += int((values.abs() > hi).sum())
    assert cut > 0


def test_extract_needs_two_checkpoints_of_one_family(files, tmp_path):
    folder, base, adapter, lora = files
    with quiet():
        sd2 = tiny.seeded_build(lambda: instantiate(tiny.tiny_sd2_config()), 5, lambda m: [m.cond_stage_model])
    other = tmp_path / "sd2.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd2.state_dict().items()}, str(other))
    with pytest.raises(UserError, match="extract needs two checkpoints of the same family"):
        extract(base, other, 4, tmp_path / "x.safetensors", adapter=adapter)


def test_bake_on_a_fused_attention_text_encoder(tmp_path):
    """SD2's OpenCLIP text encoder: a q/k/v part's change goes into its rows of in_proj_weight."""
    with quiet():
        model = tiny.seeded_build(lambda: instantiate(tiny.tiny_sd2_config()), 5, lambda m: [m.cond_stage_model])
        base = tiny.save_checkpoint(model, tmp_path / "sd2.safetensors", config_for=tiny.tiny_sd2_config)
    adapter = registry.load_adapter(str(base))
    lora = _random_lora(adapter, tmp_path / "te.safetensors", 3, conv=False)
    assert any(t.part == "k" for t in adapter.lora_targets())
    out = bake(base, [(str(lora), 1.0)], tmp_path / "baked.safetensors", adapter=adapter).path
    net = network_from_file(lora, adapter.file_targets())
    want_text, want_noise = _outputs(adapter, [net])
    text, noise = _outputs(registry.load_adapter(str(out)))
    torch.testing.assert_close(text, want_text, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(noise, want_noise, atol=1e-4, rtol=1e-4)
