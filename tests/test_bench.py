"""`lora_train.bench`: a LoRA step against its no-LoRA floor, on the tiny model (fast)."""

import math
import statistics

import pytest
import torch
from conftest import assert_same_as, snapshot

from lora_train.bench import BenchModel, build_model, format_bench, run_bench


@pytest.fixture(autouse=True)
def one_thread():
    """On a busy 2-core machine two intra-op threads make the tiny model's small ops 10-100x slower
    (each waits for the other to be scheduled); one thread keeps these tests at about a second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bench_model(tiny_model) -> BenchModel:
    return BenchModel("tiny", tiny_model.model.diffusion_model, 64, tiny_model.cond_stage_model.transformer)


def check_result(r: dict, steps: int) -> None:
    assert len(r["lora_times_ms"]) == len(r["floor_times_ms"]) == steps
    assert all(t > 0 for t in r["lora_times_ms"] + r["floor_times_ms"])
    assert r["lora_ms"] > 0 and r["floor_ms"] > 0
    assert r["lora_ms"] == pytest.approx(statistics.median(r["lora_times_ms"]))
    assert r["floor_ms"] == pytest.approx(statistics.median(r["floor_times_ms"]))
    assert r["ratio"] == pytest.approx(r["lora_ms"] / r["floor_ms"])
    assert r["ratio_min"] == pytest.approx(min(r["lora_times_ms"]) / min(r["floor_times_ms"]))
    assert r["peak_rss_mb"] > 50
    assert r["threads"] == torch.get_num_threads()
    # the LoRA path was real: every LoRA module was hooked, it changed the output, and AdamW moved it
    assert r["lora_modules"] > 0 and r["hooked_modules"] == r["lora_modules"]
    assert math.isfinite(r["floor_loss"])
    assert all(abs(loss - r["floor_loss"]) > 1e-7 for loss in r["lora_losses"])
    assert len(set(r["lora_losses"])) == len(r["lora_losses"])


def test_tiny_bench_times_and_leaves_the_model_as_it_was(tiny_model):
    before = snapshot(tiny_model)
    r = run_bench("tiny", 64, 4, steps=2, warmup=1, model=tiny_bench_model(tiny_model))
    assert (r["arch"], r["resolution"], r["dim"], r["batch"], r["text"]) == ("tiny", 64, 4, 1, False)
    assert r["latent"] == [1, 4, 8, 8] and r["context"] == [1, 77, 64]
    check_result(r, 2)
    linear = torch.nn.Linear
    sizes = [
        (m.in_features + m.out_features) if isinstance(m, linear) else (m.in_channels + m.out_channels)
        for m in _unet_targets(tiny_model)
    ]
    assert r["lora_params"] == 4 * sum(sizes)
    assert_same_as(tiny_model, before)
    assert not [n for n, m in tiny_model.named_modules() if m._forward_hooks]
    assert all(p.grad is None for p in tiny_model.parameters())
    # the attention a run trains with outside the WebUI: SDPA in the UNet's 32 CrossAttention layers, then theirs again
    assert r["attention"] == "sdpa" and r["sdpa_modules"] == 32 and "attention sdpa (32 layers)" in format_bench(r)
    assert not [n for n, m in tiny_model.named_modules() if "forward" in m.__dict__]
    own = run_bench("tiny", 64, 4, steps=1, warmup=0, model=tiny_bench_model(tiny_model), attention="model")
    assert own["sdpa_modules"] == 0 and own["floor_loss"] == pytest.approx(r["floor_loss"], rel=1e-5)


def test_tiny_bench_with_text_encoder_leaves_it_as_it_was(tiny_model):
    before = snapshot(tiny_model)
    r = run_bench("tiny", 64, 4, batch=2, steps=3, warmup=0, text=True, model=tiny_bench_model(tiny_model))
    assert r["text"] and r["text_params"] > 0 and r["latent"] == [2, 4, 8, 8]
    check_result(r, 3)
    assert r["lora_modules"] == len(_unet_targets(tiny_model)) + 12  # 2 CLIP layers x (q, k, v, out, fc1, fc2)
    assert_same_as(tiny_model, before)


def test_bench_builds_its_own_tiny_model_and_formats():
    r = run_bench("tiny", 64, 4, steps=2)
    check_result(r, 2)
    assert r["build_s"] > 0 and r["total_s"] >= r["build_s"]
    assert r["threads"] == 1
    text = format_bench(r)
    assert f"{r['lora_ms']:.1f} ms" in text and f"{r['floor_ms']:.1f} ms" in text
    assert f"{r['ratio']:.3f}" in text and f"{r['peak_rss_mb']:.0f} MB" in text
    assert f"{r['threads']} threads" in text


def test_bench_rejects_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="arch"):
        build_model("sd3")
    with pytest.raises(ValueError, match="multiple of 8"):
        run_bench("tiny", 60, 4, model=tiny_bench_model(tiny_model))
    with pytest.raises(ValueError, match="built for"):
        run_bench("sd15", 64, 4, model=tiny_bench_model(tiny_model))


def _unet_targets(tiny_model):
    from lora_train.network.targets import ldm_unet_targets

    return [t.module for t in ldm_unet_targets(tiny_model.model.diffusion_model)]


@pytest.mark.parametrize("network,key", [("loha", "hada_w1_a"), ("lokr", "lokr_w1"), ("dora", "dora_scale")])
def test_bench_times_each_lycoris_network(tiny_model, network, key, monkeypatch):
    """`bench --network loha|lokr|dora` trains that algorithm's modules (their keys) and leaves the model as it was."""
    from lora_train.network import network as network_module

    built = []
    real = network_module.LoRANetwork.__init__

    def record(self, *args, **kwargs):
        real(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(network_module.LoRANetwork, "__init__", record)
    before = snapshot(tiny_model)
    r = run_bench("tiny", 64, 4, steps=2, warmup=0, model=tiny_bench_model(tiny_model), network=network)
    assert r["network"] == network and f"  {network}  " in format_bench(r)
    check_result(r, 2)
    assert any(k.endswith("." + key) for k in built[0].state_dict())
    assert_same_as(tiny_model, before)
