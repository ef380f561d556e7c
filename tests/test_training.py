"""The training loop on the tiny model: it learns, and it leaves the host model exactly as it was."""

import threading

import pytest
import torch
from conftest import assert_same_as, make_dataset, snapshot

from lora_train.app import job
from lora_train.errors import UserError
from lora_train.network.files import load_lora
from lora_train.train import events as ev
from lora_train.train import loss as loss_fn
from lora_train.train.config import TrainConfig


def config_for(tmp_path, **overrides):
    data = make_dataset(tmp_path / "data", count=4, repeats=2)
    values = {
        "train_data_dir": str(data),
        "output_dir": str(tmp_path / "out"),
        "output_name": "t",
        "resolution": "64",
        "network_dim": 8,
        "network_alpha": 8,
        "learning_rate": 1e-3,
        "max_train_steps": 10,
        "train_batch_size": 2,
        "seed": 7,
    }
    values.update(overrides)
    return TrainConfig().update(values)


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, e):
        self.events.append(e)

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


def test_loss_goes_down(tiny_adapter, tmp_path):
    """Fixed seed; one image per caption so the LoRA can fit it: late mean loss < early mean loss."""
    cfg = config_for(tmp_path, max_train_steps=120, learning_rate=3e-3, train_batch_size=4)
    rec = Recorder()
    job.build_trainer(cfg, tiny_adapter).run(rec)
    losses = [e.loss for e in rec.of(ev.Step)]
    assert len(losses) == 120
    early, late = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert late < 0.9 * early, (early, late)


def test_same_seed_same_lora(tiny_adapter, tmp_path):
    a = job.build_trainer(config_for(tmp_path / "a", max_train_steps=4), tiny_adapter).run()
    b = job.build_trainer(config_for(tmp_path / "b", max_train_steps=4), tiny_adapter).run()
    ta, tb = load_lora(a)[0], load_lora(b)[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_run_restores_host_model_and_writes_a_valid_file(tiny_adapter, tiny_model, tmp_path):
    before = snapshot(tiny_model)
    rec = Recorder()
    path = job.build_trainer(config_for(tmp_path, conv_dim=4, conv_alpha=1), tiny_adapter).run(rec)
    assert_same_as(tiny_model, before)
    assert rec.of(ev.Finished)[0].path == str(path)
    tensors, md = load_lora(path)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in tensors)  # LoCon modules were trained
    assert md["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "1.0"}'
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_steps"] == "10"
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().sum() > 0 for v in ups)


def test_text_encoder_lora_gets_trained_and_unet_only_skips_it(tiny_adapter, tmp_path):
    path = job.build_trainer(config_for(tmp_path / "te", max_train_steps=3), tiny_adapter).run()
    tensors = load_lora(path)[0]
    te_ups = [v for k, v in tensors.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_ups and all(v.abs().sum() > 0 for v in te_ups)
    path = job.build_trainer(config_for(tmp_path / "u", max_train_steps=3, network_train_unet_only=True), tiny_adapter).run()
    tensors, md = load_lora(path)
    assert not any(k.startswith("lora_te_") for k in tensors)
    assert md["ss_text_encoder_lr"] == "0"


def test_cancel_restores_model_and_saves_interrupted(tiny_adapter, tiny_model, tmp_path):
    before = snapshot(tiny_model)
    cancel = threading.Event()
    rec = Recorder()

    def listener(e):
        rec(e)
        if isinstance(e, ev.Step) and e.step == 3:
            cancel.set()

    path = job.build_trainer(config_for(tmp_path), tiny_adapter).run(listener, cancel)
    assert_same_as(tiny_model, before)
    assert path.name == "t-interrupted.safetensors"
    assert rec.of(ev.Cancelled)[0].step == 3
    assert load_lora(path)[1]["ss_steps"] == "3"


def test_epochs_and_periodic_saves(tiny_adapter, tmp_path):
    cfg = config_for(tmp_path, max_train_epochs=4, save_every_n_epochs=2)
    rec = Recorder()
    trainer = job.build_trainer(cfg, tiny_adapter)
    assert (trainer.plan.steps_per_epoch, trainer.plan.total_steps) == (4, 16)  # 4 images x 2 repeats / batch 2
    trainer.run(rec)
    saved = [e.path for e in rec.of(ev.CheckpointSaved)]
    assert [p.rsplit("/", 1)[-1] for p in saved] == ["t-000002.safetensors"]
    assert (tmp_path / "out" / "t.safetensors").is_file()
    assert load_lora(saved[0])[1]["ss_epoch"] == "2"
    assert [e.epoch for e in rec.of(ev.EpochEnd)] == [1, 2, 3, 4]


def test_noise_and_targets_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a = torch.tensor([0.99, 0.5, 0.01])
    noisy = loss_fn.add_noise(x0, noise, a)
    for k in range(3):
        assert torch.allclose(noisy[k], a[k].sqrt() * x0[k] + (1 - a[k]).sqrt() * noise[k])
        v = loss_fn.target(x0, noise, a, "v")[k]
        assert torch.allclose(v, a[k].sqrt() * noise[k] - (1 - a[k]).sqrt() * x0[k])
        # v and eps describe the same x_t: x0 = sqrt(a) x_t - sqrt(1-a) v
        assert torch.allclose(a[k].sqrt() * noisy[k] - (1 - a[k]).sqrt() * v, x0[k], atol=1e-5)
    assert loss_fn.target(x0, noise, a, "epsilon") is noise
    with pytest.raises(ValueError):
        loss_fn.target(x0, noise, a, "x0")


def test_trainer_uses_the_models_prediction_type(tiny_model, tmp_path, monkeypatch):
    from lora_train.model.ldm import LdmAdapter

    seen = []
    real = loss_fn.target
    monkeypatch.setattr(loss_fn, "target", lambda *a: seen.append(a[3]) or real(*a))
    monkeypatch.setattr(tiny_model, "parameterization", "v")
    adapter = LdmAdapter(tiny_model)
    assert adapter.info.base_model_version == "sd_v1_v"
    path = job.build_trainer(config_for(tmp_path, max_train_steps=2), adapter).run()
    assert seen == ["v", "v"]
    assert load_lora(path)[1]["modelspec.prediction_type"] == "v"


def test_token_warmup_reaches_the_text_encoder_and_refuses_the_text_cache(tiny_adapter, tmp_path, monkeypatch):
    """Captions "zkz, a red circle, white background" (3 tags), warm-up from 1 tag over 2 steps."""
    seen = []
    real = tiny_adapter.encode_captions
    monkeypatch.setattr(tiny_adapter, "encode_captions", lambda caps, *o: seen.append(list(caps)) or real(caps, *o))
    cfg = config_for(tmp_path / "w", max_train_steps=4, train_batch_size=1, token_warmup_min=1, token_warmup_step=2)
    job.build_trainer(cfg, tiny_adapter).run()
    assert [len(caps[0].split(", ")) for caps in seen] == [1, 2, 3, 3]
    assert seen[0] == ["zkz"]
    with pytest.raises(UserError, match="token warm-up"):
        job.build_trainer(config_for(tmp_path / "c", max_train_steps=1, network_train_unet_only=True, cache_text_encoder_outputs=True,
                                     token_warmup_step=2), tiny_adapter).run()


def test_max_token_length_and_weighted_captions_reach_the_text_encoder(tiny_adapter, tmp_path, monkeypatch):
    from lora_train.model.caption_tokens import TextOptions

    seen = []
    real = tiny_adapter.encode_captions

    def spy(caps, options=TextOptions()):
        out = real(caps, options)
        seen.append((tuple(out.shape[:2]), options))
        return out

    monkeypatch.setattr(tiny_adapter, "encode_captions", spy)
    path = job.build_trainer(config_for(tmp_path / "a", max_train_steps=1, max_token_length=225, weighted_captions=True), tiny_adapter).run()
    assert seen == [((2, 227), TextOptions(225, weighted=True))]
    assert load_lora(path)[1]["ss_max_token_length"] == "225"
    with pytest.raises(UserError, match="max_token_length must be 75, 150 or 225"):
        job.build_trainer(config_for(tmp_path / "b", max_train_steps=1, max_token_length=100), tiny_adapter).run()
