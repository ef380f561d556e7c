"""The Train tab's run manager on the standalone host and the real tiny ldm model: queue, stop,
resume, save now, publishing with cards, failures that leave the model and the last save intact."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import assert_same_as, make_dataset, small_run_config, snapshot
from lora_train.errors import UserError
from lora_train.host.standalone import StandaloneHost
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig
from lora_train.app.runs import RunManager, RunRequest


class TinyHost(StandaloneHost):
    """The standalone host over the session's tiny model (no reload per test), with hooks for tests."""

    def __init__(self, model, lora_dir, work_dir):
        super().__init__("builtin:tiny", lora_dir, work_dir)
        self._loaded = model
        self.events: list = []
        self.step_gate: threading.Event | None = None  # when set, each step waits for it
        self.fail_at_step: int | None = None

    def on_event(self, e):
        self.events.append(e)
        if isinstance(e, ev.Step):
            if self.fail_at_step is not None and e.step == self.fail_at_step:
                raise RuntimeError("boom at step %d" % e.step)
            gate = self.step_gate
            if gate is not None:
                assert gate.wait(60)
                gate.clear()


def config_for(data: Path, name: str = "runlora", epochs: int = 2, **extra) -> TrainConfig:
    return small_run_config(data, name, epochs, **extra)


@pytest.fixture
def host(tmp_path, tiny_model):
    return TinyHost(tiny_model, tmp_path / "Lora", tmp_path / "runs")


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data", count=4, repeats=1)


def test_run_publishes_every_save_with_card_preview_and_self_test(host, data, tiny_model):
    before = snapshot(tiny_model)
    manager = RunManager(host)
    status = manager.submit(RunRequest(config_for(data), trigger="zkz", preview_prompts=["zkz, a photo --w 64 --h 64 --s 2"]))
    assert manager.wait(300)
    run = manager.run(status.id)
    assert run.phase == "finished", run.error
    assert run.step == run.total_steps == 4 and run.epochs == 2
    assert run.trigger == "zkz", "the grid's default prompt, also after a page reload"
    assert [s for s, _ in run.losses] == [1, 2, 3, 4]
    lora_dir = host.lora_dir()
    assert sorted(p.name for p in lora_dir.glob("*.safetensors")) == ["runlora-000001.safetensors", "runlora.safetensors"]
    for stem in ("runlora-000001", "runlora"):
        card = json.loads((lora_dir / f"{stem}.json").read_text(encoding="utf-8"))
        assert card["activation text"] == "zkz" and card["sd version"] == "SD1" and card["preferred weight"] == 1.0
        assert (lora_dir / f"{stem}.preview.png").is_file()
        with safe_open(str(lora_dir / f"{stem}.safetensors"), "pt") as f:
            meta = f.metadata()
        # every epoch file carries the run's name, as sd-scripts writes it; ss_epoch tells them apart
        assert meta["ss_output_name"] == meta["modelspec.title"] == "runlora" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_epoch"] == ("1" if stem.endswith("-000001") else "2")
    assert len(run.checks) == 2 and all("every module matched" in c for c in run.checks.values())
    assert not list(lora_dir.rglob("*.pt")), "state files must stay out of the LoRA folder"
    assert (Path(run.work_dir) / "runlora.toml").is_file() and (Path(run.work_dir) / "runlora-loss.csv").is_file()
    assert len(run.previews) == 2
    assert_same_as(tiny_model, before)


def test_names_are_unique_across_runs_and_existing_files(host, data):
    host.lora_dir().mkdir(parents=True)
    (host.lora_dir() / "runlora.safetensors").write_bytes(b"someone else's")
    manager = RunManager(host)
    a = manager.submit(RunRequest(config_for(data, epochs=1)), start=False)
    b = manager.submit(RunRequest(config_for(data, epochs=1)), start=False)
    assert (a.name, b.name) == ("runlora_2", "runlora_3")
    assert (host.lora_dir() / "runlora.safetensors").read_bytes() == b"someone else's"
    manager.start_queue()
    assert manager.wait(300)
    assert [manager.run(s.id).phase for s in (a, b)] == ["finished", "finished"]
    assert (host.lora_dir() / "runlora_3.safetensors").is_file()


def test_stop_save_now_and_resume_continue_the_same_run(host, data, tiny_model):
    before = snapshot(tiny_model)
    host.step_gate = threading.Event()
    manager = RunManager(host)
    queued = manager.submit(RunRequest(config_for(data, epochs=3)))
    second = manager.submit(RunRequest(config_for(data, name="other", epochs=1)))
    while not any(isinstance(e, ev.Step) for e in host.events):
        host.step_gate.set()  # let steps go one at a time
        threading.Event().wait(0.05)
    assert manager.save_now()
    host.step_gate.set()  # step 2 runs, then the save
    while not any(isinstance(e, ev.CheckpointSaved) for e in host.events):
        threading.Event().wait(0.05)
    assert manager.stop()
    gate, host.step_gate = host.step_gate, None
    gate.set()
    assert manager.wait(120)
    run = manager.run(queued.id)
    assert run.phase == "cancelled"
    # the stopped run's status is about the stop only: when, and nothing of the running or stopping run
    assert run.ended_at and not run.stopping and run.eta_seconds is None
    assert not [m for m in run.messages if "stopping" in m.lower()], run.messages
    names = sorted(Path(p).name for p in run.published)
    assert any(n.startswith("runlora-step") for n in names) and "runlora-interrupted.safetensors" in names
    assert run.resume_state and Path(run.resume_state).is_dir()
    assert manager.run(second.id).phase == "queued", "Stop pauses the queue"
    assert_same_as(tiny_model, before)

    resumed = manager.resume()
    assert resumed.name == "runlora"
    assert manager.wait(300)
    done = manager.run(resumed.id)
    assert done.phase == "finished", done.error
    runs, current = [], None  # Step events per run, split at each Started
    for e in host.events:
        if isinstance(e, ev.Started):
            current = []
            runs.append((e.total_steps, current))
        elif isinstance(e, ev.Step):
            current.append(e.step)
    assert [total for total, _ in runs] == [6, 6, 2], "the resumed run goes before the queued one"
    trained = runs[0][1] + runs[1][1]
    assert trained == list(range(1, 7)), "resume continues after the last trained step, no step twice"
    assert [s for s, _ in done.losses] == trained, "the resumed run shows the whole loss history"
    # the finished run replaces its interrupted save: gone from the LoRA folder and the list, kept in the work folder
    interrupted = [p for p in run.published if "-interrupted" in p]
    assert set(run.published) - set(interrupted) <= set(done.published)
    assert not [p for p in done.published if "-interrupted" in p], done.published
    assert not list(host.lora_dir().glob("runlora-interrupted*")), sorted(p.name for p in host.lora_dir().iterdir())
    assert (Path(done.work_dir) / "runlora-interrupted.safetensors").is_file()
    assert done.step == 6
    assert manager.run(second.id).phase == "finished", "Resume un-pauses the queue"
    assert (host.lora_dir() / "runlora.safetensors").is_file()
    assert_same_as(tiny_model, before)


def test_failure_keeps_last_save_and_model_and_manager_usable(host, data, tiny_model):
    before = snapshot(tiny_model)
    host.fail_at_step = 3
    manager = RunManager(host)
    s = manager.submit(RunRequest(config_for(data, epochs=3)))
    assert manager.wait(300)
    run = manager.run(s.id)
    assert run.phase == "failed" and "boom at step 3" in run.error
    names = sorted(Path(p).name for p in run.published)
    assert names == ["runlora-000001.safetensors", "runlora-interrupted.safetensors"]
    for p in run.published:  # both complete, loadable files
        with safe_open(p, "pt") as f:
            assert len(list(f.keys())) > 0
    assert_same_as(tiny_model, before)
    host.fail_at_step = None
    again = manager.resume()
    assert manager.wait(300)
    assert manager.run(again.id).phase == "finished"


def test_refusal_and_bad_dataset_are_reported_not_raised(host, tmp_path):
    class Refusing(TinyHost):
        def preflight(self, config):
            return ["--lowvram is on: training needs the whole UNet on the GPU"]

    refusing = Refusing(host._loaded, tmp_path / "L2", tmp_path / "r2")
    manager = RunManager(refusing)
    s = manager.submit(RunRequest(config_for(tmp_path)))
    assert manager.wait(60)
    assert manager.run(s.id).phase == "refused" and "--lowvram" in manager.run(s.id).error

    manager = RunManager(host)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(UserError, match="no-such-folder' does not exist"):  # refused at Start, nothing queued
        manager.submit(RunRequest(config_for(missing)))
    folder = make_dataset(tmp_path / "ok", count=2)
    bad_size = config_for(folder)
    bad_size.dataset.resolution = "abc"
    with pytest.raises(UserError, match="'abc'"):  # what the plan says, at Start too
        manager.submit(RunRequest(bad_size))
    bad_algo = config_for(folder)
    bad_algo.update({"network_module": "lycoris.kohya", "network_args": ["algo=lohaa"]})
    with pytest.raises(UserError, match="did you mean 'loha'"):
        manager.submit(RunRequest(bad_algo))
    assert manager.latest() is None  # nothing was queued
    empty = tmp_path / "empty-folder"
    (empty / "5_zkz").mkdir(parents=True)
    s = manager.submit(RunRequest(config_for(empty)))
    assert manager.wait(60)
    run = manager.run(s.id)
    assert run.phase == "failed" and "no images" in run.error and "5_zkz" in run.error
    assert not list(host.lora_dir().glob("*.safetensors")) if host.lora_dir().exists() else True


def test_grid_rows_are_epochs_columns_weights_and_weight_zero_is_the_base(host, data):
    import numpy as np
    from PIL import Image

    manager = RunManager(host)
    s = manager.submit(RunRequest(config_for(data, epochs=2, learning_rate=0.05), previews=False))
    assert manager.wait(300)
    files = [Path(p) for p in manager.run(s.id).published]
    out = host.xyz_grid(files, [1.0, 0.0], "zkz", 7, host.work_dir() / "grid.png")
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    size, label_w, head_h = 64, 160, 24
    assert grid.shape == (head_h + size * 2, label_w + size * 2, 3)

    def cell(row, col):
        return grid[head_h + row * size: head_h + (row + 1) * size, label_w + col * size: label_w + (col + 1) * size]

    assert np.array_equal(cell(0, 1), cell(1, 1)), "weight 0 renders the base model in every row"
    assert np.abs(cell(1, 0) - cell(1, 1)).mean() > 1.0, "weight 1 shows the LoRA"


def test_the_end_time_comes_with_the_end_phase():
    """The tab reads a status at any moment: one that says "finished" also says when (it read '-')."""
    from lora_train.app.runs import RunStatus

    status = RunStatus(id=1, name="x")
    assert status.ended_at is None
    status.phase = "training"
    assert status.ended_at is None
    status.phase = "finished"
    first = status.ended_at
    assert first is not None
    status.phase = "finished"
    assert status.ended_at == first
