"""Estimates before Start: a calibration on the loaded model that leaves it bit-identical and writes
nothing into the output folder, cached per cost settings, the max_train_minutes epoch fit, the
after-run error line, and the estimate against a measured run on the tiny model."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_same_as, make_dataset, small_run_config, snapshot

from lora_train.app import job
from lora_train.train import estimate as est
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("estimate") / "data", count=4, repeats=2)


def _config(data, tmp_path, **extra):
    return small_run_config(data, "est", epochs=3, output_dir=str(tmp_path / "out"), **extra)


def test_calibration_leaves_the_model_bit_identical_and_writes_nothing(tiny_adapter, data, tmp_path):
    config = _config(data, tmp_path, cache_latents=True, gradient_checkpointing=True)
    before = snapshot(tiny_adapter.model)
    rng = torch.get_rng_state()
    result, plan, lines = job.prepare_estimate(config, tiny_adapter, tmp_path / "cache", calibrate=True)
    assert_same_as(tiny_adapter.model, before)
    assert torch.equal(torch.get_rng_state(), rng), "the caller's random state moved"
    assert not (tmp_path / "out").exists()  # nothing in the output folder; the cache only
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [est.CACHE_FILE]
    assert not result.cached and result.steps == est.CALIBRATION_STEPS and (result.width, result.height, result.batch) == (64, 64, 2)
    assert result.seconds_per_step > 0 and result.peak_mb > 0 and result.memory == "rss"
    assert result.encode_seconds > 0  # cache_latents: one image went through the VAE
    assert lines[0].startswith("estimate: ") and f"x {plan.total_steps} steps" in lines[0]
    assert lines[-1] == "  " + "from 3 calibration steps at 64x64, batch 2"


def test_the_cache_is_reused_and_invalidated_by_a_cost_setting(tiny_adapter, data, tmp_path, monkeypatch):
    calls = []

    def fake_calibrate(config, adapter, network, plan, steps=est.CALIBRATION_STEPS, warmup=est.WARMUP_STEPS):
        calls.append(config.network.network_dim)
        return est.Estimate(0.5, 100.0, "rss", width=64, height=64, batch=2, steps=steps)

    monkeypatch.setattr(est, "calibrate", fake_calibrate)
    cache = tmp_path / "cache"
    first, _, _ = job.prepare_estimate(_config(data, tmp_path), tiny_adapter, cache, calibrate=True)
    again, _, lines = job.prepare_estimate(_config(data, tmp_path), tiny_adapter, cache, calibrate=True)
    assert calls == [4] and not first.cached and again.cached  # the second call ran no step
    assert lines[-1] == "  from the cache: these settings were calibrated on this model before"
    assert dataclasses.replace(again, cached=False) == first
    # not a cost setting: the learning rate, the epochs, the name
    job.prepare_estimate(_config(data, tmp_path, learning_rate=5e-4, max_train_epochs=9, output_name="other"), tiny_adapter, cache,
                         calibrate=True)
    assert calls == [4]
    for change in ({"network_dim": 8}, {"train_batch_size": 1}, {"gradient_checkpointing": True}, {"cache_latents": True},
                   {"network_train_unet_only": True}, {"resolution": "128"}, {"optimizer_type": "Lion"}):
        job.prepare_estimate(_config(data, tmp_path, **change), tiny_adapter, cache, calibrate=True)
        assert len(calls) == 2, change  # calibrated again ...
        job.prepare_estimate(_config(data, tmp_path, **change), tiny_adapter, cache, calibrate=True)
        assert len(calls) == 2, change  # ... and then cached
        calls[1:] = []
        (cache / est.CACHE_FILE).write_text("{}")
        job.prepare_estimate(_config(data, tmp_path), tiny_adapter, cache, calibrate=True)
        calls[:] = [4]
    # without calibrate (a run's start), nothing cached means no estimate and no step
    (cache / est.CACHE_FILE).unlink()
    assert job.prepare_estimate(_config(data, tmp_path), tiny_adapter, cache)[0] is None and calls == [4]


def test_fit_epochs_takes_the_most_epochs_that_fit():
    # 60 s per epoch and 30 s before the first step
    def seconds(e):
        return 30 + 60 * e

    assert est.fit_epochs(seconds, 10, 7.5) == 7  # 30 + 420 = 450 s = 7.5 min exactly
    assert est.fit_epochs(seconds, 10, 7.49) == 6
    assert est.fit_epochs(seconds, 10, 100) == 10  # never more than the run's own epochs
    assert est.fit_epochs(seconds, 10, 0.5) == 1  # none fits: one epoch


def test_cut_to_epochs_keeps_a_step_budget_inside_the_last_epoch():
    plan = SimpleNamespace(epochs=4, steps_per_epoch=30, total_steps=100)  # max_train_steps 100 ends inside epoch 4
    cut = est.cut_to_epochs(dataclasses.replace(_plan_like(plan)), 3)
    assert (cut.epochs, cut.total_steps) == (3, 90)
    cut = est.cut_to_epochs(_plan_like(plan), 4)
    assert (cut.epochs, cut.total_steps) == (4, 100)


def _plan_like(ns):
    @dataclasses.dataclass
    class P:
        epochs: int
        steps_per_epoch: int
        total_steps: int

    return P(ns.epochs, ns.steps_per_epoch, ns.total_steps)


def test_max_train_minutes_sets_the_epochs_and_says_so(tiny_adapter, data, tmp_path, monkeypatch):
    per_step = 0.25
    monkeypatch.setattr(est, "calibrate", lambda *a, **k: est.Estimate(per_step, 100.0, "rss", width=64, height=64, batch=2, steps=3))
    # 4 images x 2 repeats / batch 2 = 4 steps per epoch, 1 s per epoch at 0.25 s/step
    config = _config(data, tmp_path, max_train_epochs=10, max_train_minutes=7.5 / 60)
    result, plan, lines = job.prepare_estimate(config, tiny_adapter, tmp_path / "cache")  # the budget calibrates by itself
    assert result is not None and config.training.max_train_epochs == 7 and plan.epochs == 7 and plan.total_steps == 28
    assert lines[-1] == ("max_train_minutes 0.125: 7 of 10 epochs fit (28 steps, about 7 s estimated); max_train_epochs set to 7")
    assert "x 28 steps = 7 s" in lines[0]  # the estimate shown is for the fitted plan
    config = _config(data, tmp_path, max_train_epochs=3, max_train_minutes=30)
    job.prepare_estimate(config, tiny_adapter, tmp_path / "cache")
    assert config.training.max_train_epochs == 3  # never raised
    config = _config(data, tmp_path, max_train_epochs=3, max_train_minutes=0.5 / 60)
    lines = job.prepare_estimate(config, tiny_adapter, tmp_path / "cache")[2]
    assert config.training.max_train_epochs == 1 and lines[-1] == "max_train_minutes 0.00833333: even one epoch takes about 1 s; training 1 epoch of 3"
    with pytest.raises(Exception, match="max_train_minutes must be above 0"):
        job.prepare_estimate(_config(data, tmp_path, max_train_minutes=0), tiny_adapter, tmp_path / "cache")


def test_max_train_minutes_is_a_config_key_in_and_out(tmp_path):
    config = TrainConfig().update({"max_train_minutes": 30})
    assert config.training.max_train_minutes == 30.0
    path = config.save_toml(tmp_path / "c.toml")
    assert TrainConfig.from_toml(path).training.max_train_minutes == 30.0


def test_the_after_run_error_line():
    assert est.error_percent(2.0, 2.5) == pytest.approx(-20.0)
    assert est.error_line(2.0, 600, 2.5, 500) == ("estimate vs measured: 2 vs 2.5 s/step (-20.0 %), total 10 min 00 s vs 8 min 20 s (+20.0 %)")
    clock = iter([0.0, 10.0, 12.0, 14.0, 16.0, 20.0])
    timer = est.RunTimer(torch.device("cpu"), clock=lambda: next(clock))
    timer(ev.Started(4, 4, 1, 4, []))
    for step in range(1, 5):
        timer(ev.Step(step, 1, 0.1, {}))
    timer(ev.Finished("x.safetensors", 4))
    assert timer.measured() == (2.0, 20.0, 4)  # (16 - 10) / 3 steps after the first; 20 s from Started
    plan = SimpleNamespace(blocks=[], items=[], total_steps=4, steps_per_epoch=4, epochs=1)
    config = TrainConfig()
    lines = est.after_run_lines(config, est.Estimate(2.5, 100.0, "rss", width=64, height=64), plan, timer)
    assert lines[0] == "estimate vs measured: 2.5 vs 2 s/step (+25.0 %), total 10 s vs 20 s (-50.0 %)"
    assert lines[1].startswith("  peak memory: 100 vs ")


def test_the_estimate_is_near_a_measured_run_on_the_tiny_model(tiny_adapter, data, tmp_path):
    """Plumbing, not the acceptance number: one real calibration against a real 8-step run."""
    config = _config(data, tmp_path, max_train_epochs=2, save_every_n_epochs=None)
    result = job.prepare_estimate(config, tiny_adapter, tmp_path / "cache", calibrate=True)[0]
    trainer = job.build_trainer(config, tiny_adapter)
    timer = est.RunTimer(tiny_adapter.device)
    trainer.run(timer)
    per_step, total, steps = timer.measured()
    assert steps == 8
    assert per_step / 3 < result.step_seconds(trainer.plan) < per_step * 3, (result, per_step)
    assert total / 4 < result.total_seconds(config, trainer.plan) < total * 4
    assert len(est.after_run_lines(config, result, trainer.plan, timer)) == 2


def test_cli_dry_run_estimate_and_the_run_after_it(data, tmp_path, capsys, monkeypatch):
    from lora_train.cli import main

    monkeypatch.setenv("LORA_TRAIN_CACHE", str(tmp_path / "cache"))
    args = ["train", "--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data.as_posix()}",
            "--set", f"output_dir={(tmp_path / 'out').as_posix()}", "--set", "resolution=64", "--set", "max_train_steps=4",
            "--set", "train_batch_size=2", "--set", "network_dim=4", "--set", "seed=1"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# dry run: nothing was loaded or trained" in out and "estimate:" not in out
    assert main([*args, "--dry-run", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "# dry run: the model was loaded for the estimate; nothing was trained" in out
    assert "estimate: " in out and "x 4 steps" in out and "from 3 calibration steps at 64x64, batch 2" in out
    assert not (tmp_path / "out").exists()
    # the run finds the estimate in the cache (no --estimate needed), shows it, and its error after
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "from the cache: these settings were calibrated on this model before" in err
    assert "estimate vs measured: " in err and "peak memory: " in err


def test_the_train_tab_estimates_through_the_run_manager(data, tmp_path):
    from lora_train.app.runs import RunManager
    from lora_train.host.standalone import StandaloneHost
    from lora_train.ui import chart
    from lora_train.ui.i18n import Translator

    host = StandaloneHost("builtin:tiny", tmp_path / "Lora", tmp_path / "runs")
    manager = RunManager(host)
    plan, lines = manager.estimate(_config(data, tmp_path, max_train_minutes=60))
    assert (tmp_path / "runs" / est.CACHE_FILE).is_file()  # the host's work folder keeps the cache
    assert lines[0].startswith("estimate: ") and lines[-1].startswith("max_train_minutes 60: all 3 epochs fit")
    page = chart.plan_html(plan, Translator(), lines)
    assert '<p id="lora_train_estimate"' in page and "from 3 calibration steps at 64x64, batch 2" in page
    assert not (tmp_path / "out").exists() and manager.latest() is None  # no run, no output
