"""The estimate's saves, previews and validation passes: counted as the loop schedules them (checked
against the events of real runs), priced from the calibration's unit times, and taken out of the
measured time per step after a run."""

from __future__ import annotations

import pytest
import torch

from conftest import make_dataset, small_run_config

from lora_train.app import job
from lora_train.train import estimate as est
from lora_train.train import events as ev
from lora_train.train import overheads


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("overheads") / "data", count=4, repeats=2)


def _prompts(tmp_path, lines):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


RUNS = {
    # name: extra config keys (4 images x 2 repeats / batch 2 = 4 steps per epoch unless held out)
    "epochs, steps and state": dict(max_train_epochs=3, save_every_n_epochs=1, save_every_n_steps=3, save_state=True,
                                    sample_every_n_epochs=2, sample_every_n_steps=5, sample_at_first=True),
    "step budget inside an epoch": dict(max_train_epochs=3, max_train_steps=7, save_every_n_epochs=1, sample_every_n_epochs=1,
                                        save_state_on_train_end=True),
    "validation": dict(max_train_epochs=2, validation_split=0.25, validate_every_n_steps=2, save_every_n_epochs=None,
                       sample_every_n_steps=2),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_the_schedule_counts_what_a_run_does(tiny_adapter, data, tmp_path, name):
    from lora_train.sample.previews import preview_fn

    config = small_run_config(data, "ov", output_dir=str(tmp_path / "out"),
                              sample_prompts=_prompts(tmp_path, ["a red circle --s 2 --w 64 --h 64"]), **RUNS[name])
    counted = overheads.schedule(config, job.plan_dataset(config, 64, 1, config.training.seed))
    sample_fn = preview_fn(config, tiny_adapter)
    assert job.preview_plan(sample_fn) == [overheads.Preview(2, 64, 64, 7.5)]  # sd-scripts' default scale
    trainer = job.build_trainer(config, tiny_adapter, sample_fn=sample_fn)
    seen = []
    trainer.run(seen.append)
    saves = sum(isinstance(e, (ev.CheckpointSaved, ev.Finished)) for e in seen)
    samples = sum(isinstance(e, ev.Samples) for e in seen)
    validations = sum(isinstance(e, ev.Validation) for e in seen)
    states = len(list((tmp_path / "out").glob("*-state")))
    assert (counted.saves, counted.state_saves, counted.sample_events, counted.validation_passes) == (saves, states, samples, validations)
    assert samples > 0 and (saves > 1 or name == "validation")
    if name == "validation":
        assert validations > 0 and counted.validation_images == len(trainer.plan.validation)


def test_previews_are_priced_per_call_at_their_own_size():
    def cost_at(width, height):  # 1 s a forward, 1.5 s a CFG pair, 2 s a decode at 64x64; twice that at 128x64
        return overheads.SizeCost(1.0, 1.5, 2.0).scaled(width * height / (64 * 64))

    # 20 steps under CFG: 20 forwards of a batch of two, plus the decode
    assert overheads.preview_seconds([overheads.Preview(20, 64, 64, 7.0)], cost_at) == 32.0
    assert overheads.preview_seconds([overheads.Preview(20, 64, 64, 1.0)], cost_at) == 22.0  # no CFG: batch of one
    assert overheads.preview_seconds([overheads.Preview(20, 128, 64, 7.0)], cost_at) == 64.0
    # an estimate uses a size's own timing where it has one, else scales its own by area
    e = est.Estimate(1.0, 100.0, "rss", forward_seconds=1.0, cfg_forward_seconds=1.5, decode_seconds=2.0, width=64, height=64,
                     sizes={"512x512": [3.0, 5.0, 7.0]})
    assert e.cost_at(512, 512) == overheads.SizeCost(3.0, 5.0, 7.0)
    assert e.cost_at(128, 64) == overheads.SizeCost(2.0, 3.0, 4.0)


def test_a_preview_size_is_timed_once_and_cached(tiny_adapter, data, tmp_path, monkeypatch):
    config = small_run_config(data, "ov", output_dir=str(tmp_path / "out"))
    timed = []
    real = est.time_size
    monkeypatch.setattr(est, "time_size", lambda adapter, w, h: timed.append((w, h)) or real(adapter, w, h))
    previews = [overheads.Preview(4, 128, 128, 7.0), overheads.Preview(4, 64, 64, 7.0)]  # 64x64 is the calibration size
    plan = job.plan_dataset(config, 64, 1, config.training.seed)

    def network():
        return job.build_network(config, tiny_adapter, 1)

    first = est.estimate(config, tiny_adapter, plan, network, tmp_path / "cache", previews=previews)
    assert timed == [(128, 128)] and all(v > 0 for v in first.sizes["128x128"])
    again = est.estimate(config, tiny_adapter, plan, network, tmp_path / "cache", run_steps=False, previews=previews)
    assert again.cached and timed == [(128, 128)] and again.sizes == first.sizes  # from the cache, not timed again


def test_the_estimate_total_includes_saves_and_previews(tiny_adapter, data, tmp_path):
    config = small_run_config(data, "ov", output_dir=str(tmp_path / "out"), max_train_epochs=2)
    plan = job.plan_dataset(config, 64, 1, config.training.seed)
    bare = est.Estimate(1.0, 100.0, "rss", width=64, height=64)
    priced = est.Estimate(1.0, 100.0, "rss", forward_seconds=0.25, cfg_forward_seconds=0.5, decode_seconds=1.0, save_seconds=2.0,
                          state_seconds=3.0,
                          width=64, height=64, previews=(overheads.Preview(4, 64, 64, 7.0),))
    config.sampling.sample_every_n_epochs = 1
    # 8 steps; 2 saves (epoch 1 and the final file); 2 sample events of (4 steps x 0.5 + 1) s
    assert plan.total_steps == 8
    assert bare.total_seconds(config, plan) == 8.0
    assert priced.total_seconds(config, plan) == 8.0 + 2 * 2.0 + 2 * 3.0
    assert "(with 10 s for saves 4 s, previews 6 s, validation 0 s)" in "\n".join(est.estimate_lines(config, priced, plan))


def test_the_run_timer_takes_pauses_out_of_the_time_per_step():
    clock = iter([0.0, 10.0, 12.0, 20.0, 22.0, 24.0, 30.0])
    timer = est.RunTimer(torch.device("cpu"), clock=lambda: next(clock))
    timer(ev.Started(4, 4, 1, 4, []))  # 0
    timer(ev.Step(1, 1, 0.1, {}))  # 10
    timer(ev.Step(2, 1, 0.1, {}))  # 12
    timer(ev.CheckpointSaved("a.safetensors", 1, 2))  # 20: an 8 s save after step 2
    timer(ev.Step(3, 1, 0.1, {}))  # 22
    timer(ev.Step(4, 1, 0.1, {}))  # 24
    timer(ev.Finished("x.safetensors", 4))  # 30
    assert timer.measured() == (2.0, 30.0, 4)  # (24 - 10 - 8) / 3


def test_a_calibration_times_the_units_it_prices(tiny_adapter, data, tmp_path):
    config = small_run_config(data, "ov", output_dir=str(tmp_path / "out"))
    result = job.prepare_estimate(config, tiny_adapter, tmp_path / "cache", calibrate=True)[0]
    assert result.forward_seconds > 0 and result.cfg_forward_seconds > 0 and result.decode_seconds > 0 and result.save_seconds > 0 and result.state_seconds > 0
    assert result.encode_seconds > 0
    assert not (tmp_path / "out").exists()


def test_the_train_tab_estimate_prices_the_run_previews(data, tmp_path):
    from lora_train.app.runs import RunManager, RunRequest
    from lora_train.host.standalone import StandaloneHost

    manager = RunManager(StandaloneHost("builtin:tiny", tmp_path / "Lora", tmp_path / "runs"))
    config = small_run_config(data, "ov", output_dir=str(tmp_path / "out"), max_train_epochs=2)
    _, without = manager.estimate(config)
    _, lines = manager.estimate(config, RunRequest(config, trigger="zkz", previews=True))  # the cached calibration
    assert all("previews 0 s" in line for line in without if "previews" in line)
    previews = [line for line in lines if "previews" in line]
    assert len(previews) == 1 and "previews 0 s" not in previews[0], lines
    assert not (tmp_path / "out").exists()
