"""SDPA in the attention layers for a run outside the WebUI (model/attention.py): the same loss and LoRA
gradients as the models' own einsum attention, a model left bit-identical with its classes' forwards
after a run, a failed run and a stopped one, and the WebUI's chosen attention left alone."""

import contextlib
import threading

import pytest
import torch
from conftest import assert_same_as, make_dataset, small_run_config, snapshot

from lora_train.app import job
from lora_train.model.attention import sdpa_attention
from lora_train.model.caption_tokens import TextOptions
from lora_train.network.network import LoRANetwork
from lora_train.train import events as ev

ATTENTION = ("CrossAttention", "AttnBlock", "CLIPAttention")


def attention_modules(model):
    return [m for m in model.modules() if type(m).__qualname__ in ATTENTION]


def own_forwards(model) -> bool:
    """Every attention layer runs its class's forward: no instance forward left."""
    return all("forward" not in m.__dict__ for m in attention_modules(model))


def step(adapter, network, use_sdpa: bool):
    """One training step's loss and LoRA gradients, text encoder trained; the VAE encodes the pixels.
    Without `use_sdpa` it is the models' own (einsum + softmax) attention: the independent reference."""
    gen = torch.Generator().manual_seed(5)
    pixels = torch.rand((2, 3, 64, 64), generator=gen) * 2 - 1
    noise = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.tensor([100, 700])
    network.zero_grad(set_to_none=True)
    with adapter.frozen(), (adapter.attention(True) if use_sdpa else contextlib.nullcontext([])) as swapped, \
            adapter.training(train_text_encoder=True), network.applied():
        if use_sdpa:
            assert {type(m).__qualname__ for m in swapped} >= {"CrossAttention", "CLIPAttention"}
        latents = adapter.encode_images(pixels, torch.Generator().manual_seed(1))
        text = adapter.encode_captions(["a red circle", "two squares, blue"], TextOptions())
        cond = adapter.condition(text, adapter.size_condition(64, 64, 2))
        pred = adapter.predict(latents + noise, t, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    return latents.detach(), loss.detach(), grads


def lora_for(adapter) -> LoRANetwork:
    network = LoRANetwork(adapter.lora_targets(conv=False), dim=4, alpha=4, seed=3)
    with torch.no_grad():  # a trained network: no factor at zero, so every gradient is there
        gen = torch.Generator().manual_seed(4)
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return network


def assert_same_step(adapter, model):
    base = snapshot(model)
    network = lora_for(adapter)
    want_latents, want_loss, want = step(adapter, network, use_sdpa=False)
    got_latents, got_loss, got = step(adapter, network, use_sdpa=True)
    assert own_forwards(model)
    assert_same_as(model, base)
    assert torch.allclose(got_latents, want_latents, atol=1e-5)  # the VAE's AttnBlock
    assert got_loss == pytest.approx(float(want_loss), rel=1e-5)
    assert got.keys() == want.keys() and any(n.startswith("lora_te") for n in want)
    # (a self-attention over one token, the tiny UNet's middle, has no gradient for q: 0 against ~1e-12)
    floor = max(float(g.norm()) for g in want.values()) * 1e-6
    for name in want:
        assert float((got[name] - want[name]).norm()) <= 1e-4 * float(want[name].norm()) + floor, name
    assert sum(float(g.abs().sum()) for g in want.values()) > 0


def test_one_step_with_sdpa_equals_the_einsum_attention_on_tiny_sd1(tiny_adapter, tiny_model):
    assert_same_step(tiny_adapter, tiny_model)


def test_one_step_with_sdpa_equals_the_einsum_attention_on_tiny_sdxl():
    from lora_train.model.loading import quiet
    from lora_train.model.sgm import SgmAdapter
    from lora_train.model.tiny_sdxl import build_tiny_sdxl

    with quiet():
        model = build_tiny_sdxl(0, sgm=False)  # ldm's attention classes, HF CLIP and OpenCLIP
    assert_same_step(SgmAdapter(model, name="tinyxl"), model)


def test_the_swap_leaves_replaced_and_instance_forwards_alone(tiny_model, monkeypatch):
    import ldm.modules.attention as attention

    cross = [m for m in tiny_model.modules() if isinstance(m, attention.CrossAttention)]
    own = cross[0].forward
    cross[0].forward = own  # an instance forward someone else put there
    try:
        with sdpa_attention([tiny_model], text_encoder=False) as swapped:
            assert cross[0] not in swapped and cross[1] in swapped
            assert not any(type(m).__qualname__ == "CLIPAttention" for m in swapped)  # text encoder not trained
        assert cross[0].__dict__["forward"] == own
    finally:
        del cross[0].forward

    def hosts_forward(self, x, context=None, mask=None):
        return own.__func__(self, x, context, mask)

    hosts_forward.__module__ = "modules.sd_hijack_optimizations"
    monkeypatch.setattr(attention.CrossAttention, "forward", hosts_forward)
    with sdpa_attention([tiny_model]) as swapped:
        assert not any(isinstance(m, attention.CrossAttention) for m in swapped)
    assert attention.CrossAttention.forward is hosts_forward


@pytest.mark.skipif("not __import__('lora_train.model.sgm_import', fromlist=['x']).sgm_available()",
                    reason="sgm not importable (set LORA_TRAIN_SGM_PATH)")
def test_sgm_attention_is_not_wrapped_again():
    from lora_train.model.loading import quiet
    from lora_train.model.tiny_sdxl import build_tiny_sdxl

    with quiet():
        model = build_tiny_sdxl(0, sgm=True)
    with sdpa_attention([model]) as swapped:  # sgm's own classes call SDPA already
        assert {type(m).__module__ for m in swapped} <= {"transformers.models.clip.modeling_clip"}


def _run(adapter, data, out, listener=None, cancel=None):
    cfg = small_run_config(data, "sdpa", epochs=2, output_dir=str(out), save_every_n_epochs=None)
    return job.build_trainer(cfg, adapter).run(listener, cancel)


def test_run_uses_sdpa_and_leaves_the_model_and_its_forwards_as_they_were(tiny_adapter, tiny_model, tmp_path):
    base = snapshot(tiny_model)
    data = make_dataset(tmp_path / "data", count=4)
    seen = []

    def listener(e):
        if isinstance(e, ev.Step):
            seen.append(sum("forward" in m.__dict__ for m in attention_modules(tiny_model)))

    assert _run(tiny_adapter, data, tmp_path / "done", listener) is not None
    assert seen and all(n == len(attention_modules(tiny_model)) for n in seen)  # UNet, VAE and text encoder
    assert own_forwards(tiny_model)
    assert_same_as(tiny_model, base)

    def fail(e):
        if isinstance(e, ev.Step) and e.step == 1:
            raise RuntimeError("boom inside the run")

    with pytest.raises(RuntimeError, match="boom"):
        _run(tiny_adapter, data, tmp_path / "failed", fail)
    assert own_forwards(tiny_model)
    assert_same_as(tiny_model, base)

    cancel = threading.Event()
    stopped = _run(tiny_adapter, data, tmp_path / "stopped", lambda e: isinstance(e, ev.Step) and cancel.set(), cancel)
    assert stopped is not None and stopped.name.endswith("-interrupted.safetensors")
    assert own_forwards(tiny_model)
    assert_same_as(tiny_model, base)


def test_an_adapter_whose_host_chose_the_attention_keeps_it(tiny_adapter, tiny_model, tmp_path):
    tiny_adapter.host_attention = True
    seen = []
    _run(tiny_adapter, make_dataset(tmp_path / "data", count=4), tmp_path / "out",
         lambda e: isinstance(e, ev.Step) and seen.append(own_forwards(tiny_model)))
    assert seen and all(seen)
