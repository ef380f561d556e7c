"""log_with / log_prefix / log_tracker_name / wandb_run_name / log_tracker_config / wandb_api_key, as
sd-scripts' prepare_accelerator and init_trackers read them. The wandb test runs where wandb is
installed (offline: WANDB_MODE=offline) and reads the losses back from the run's own file."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_dataset

from lora_train.app import job
from lora_train.errors import UserError
from lora_train.train import events as ev
from lora_train.train import trackers
from lora_train.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def config_for(tmp_path, **extra):
    data = make_dataset(tmp_path / "data", count=2)
    return TrainConfig().update({"train_data_dir": str(data), "output_dir": str(tmp_path / "out"), "output_name": "tr",
                                 "resolution": "64", "network_dim": 2, "max_train_steps": 3, "train_batch_size": 1, "seed": 1,
                                 **extra}, source="test")


def run_with_trackers(config, adapter) -> list[float]:
    trainer = job.build_trainer(config, adapter)
    listeners = trackers.build_trackers(config.logging, trainer.notes)
    losses: list[float] = []

    def listen(e):
        if isinstance(e, ev.Step):
            losses.append(e.loss)
        for tracker in listeners:
            tracker(e)

    trainer.run(listen)
    return losses


def _wandb_history(run_file: str) -> tuple[list[dict], object]:
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(run_file)
    rows, run = [], None
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            run = record.run
    return rows, run


def test_log_with_all_writes_tensorboard_and_an_offline_wandb_run(tmp_path, tiny_adapter, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = config_for(tmp_path, log_with="all", logging_dir=str(tmp_path / "logs"), log_prefix="pre_",
                        log_tracker_name="circles", wandb_run_name="first try")
    losses = run_with_trackers(config, tiny_adapter)
    assert len(losses) == 3
    (dated,) = (tmp_path / "logs").iterdir()
    assert dated.name.startswith("pre_") and len(dated.name) == len("pre_") + 14  # sd-scripts: prefix + %Y%m%d%H%M%S
    board = EventAccumulator(str(dated / "circles"))  # accelerate's TensorBoard tracker: <dated>/<tracker name>
    board.Reload()
    assert [round(s.value, 5) for s in board.Scalars("loss/current")] == [round(x, 5) for x in losses]
    (run_file,) = glob.glob(str(dated / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows, run = _wandb_history(run_file)
    logged = [(r["_step"], r["loss/current"]) for r in rows if "loss/current" in r]
    assert [(s, round(v, 5)) for s, v in logged] == [(i + 1, round(x, 5)) for i, x in enumerate(losses)]
    assert any("loss/epoch" in r for r in rows)
    assert (run.project, run.display_name) == ("circles", "first try")


def test_log_tracker_config_gives_each_tracker_its_arguments(tmp_path):
    cfg = tmp_path / "trackers.toml"
    cfg.write_text('[wandb]\nentity = "me"\ntags = ["lora"]\n\n[tensorboard]\nflush_secs = 5\n', encoding="utf-8")
    config = config_for(tmp_path, log_tracker_config=str(cfg), wandb_run_name="ignored as in sd-scripts")
    assert trackers.init_kwargs(config.logging) == {"wandb": {"entity": "me", "tags": ["lora"]}, "tensorboard": {"flush_secs": 5}}
    assert trackers.init_kwargs(config_for(tmp_path, wandb_run_name="r").logging) == {"wandb": {"name": "r"}}
    cfg.write_text('entity = "me"\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        trackers.init_kwargs(config.logging)
    assert "entity must be a table" in str(e.value)


def test_trackers_asked_for_are_never_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError) as e:
        trackers.check_trackers(config_for(tmp_path, log_with="wandb").logging)
    assert str(e.value) == "log_with wandb: the wandb package is not installed: pip install wandb"
    with pytest.raises(UserError) as e:
        trackers.check_trackers(config_for(tmp_path, log_with="tensorboard").logging)
    assert str(e.value) == "log_with tensorboard needs logging_dir: the folder TensorBoard writes to"
    with pytest.raises(UserError) as e:
        trackers.check_trackers(config_for(tmp_path, log_with="mlflow").logging)
    assert str(e.value) == "log_with 'mlflow' must be one of tensorboard, wandb, all"
    assert trackers.tracker_kinds(config_for(tmp_path).logging) == []
    assert trackers.tracker_kinds(config_for(tmp_path, logging_dir="x").logging) == ["tensorboard"]  # sd-scripts' default


def test_cli_refuses_a_missing_wandb_before_loading_the_model(tmp_path):
    blocker = tmp_path / "nowandb"
    blocker.mkdir()
    (blocker / "wandb.py").write_text("raise ImportError('no wandb here')\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(blocker), "LORA_TRAIN_LANG": "en"}
    r = subprocess.run([sys.executable, "-m", "lora_train", "train", "--set", "pretrained_model_name_or_path=/nonexistent/model.safetensors",
                        "--set", "log_with=wandb", "--set", f"train_data_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: log_with wandb: the wandb package is not installed: pip install wandb"], r.stderr


def test_secrets_stay_out_of_the_saved_config(tmp_path):
    config = config_for(tmp_path, wandb_api_key="k" * 40, huggingface_token="hf_secret", huggingface_repo_id="me/loras")
    text = (config.save_toml(tmp_path / "run.toml")).read_text(encoding="utf-8")
    assert "hf_secret" not in text and "k" * 40 not in text and "me/loras" in text


def test_the_tab_logs_what_the_config_asks_and_refuses_a_missing_tracker(tmp_path, tiny_model, monkeypatch):
    """A config loaded in the tab: its log_with is honoured there too; no_metadata files still publish and self-test."""
    from conftest import small_run_config
    from test_runs import TinyHost

    from lora_train.app.runs import RunManager, RunRequest

    data = make_dataset(tmp_path / "data", count=2)
    host = TinyHost(tiny_model, tmp_path / "Lora", tmp_path / "runs")
    manager = RunManager(host)
    config = small_run_config(data, "tab", 1, logging_dir=str(tmp_path / "logs"), no_metadata=True)
    status = manager.submit(RunRequest(config))
    assert manager.wait(300)
    run = manager.run(status.id)
    assert run.phase == "finished", run.error
    assert list((tmp_path / "logs").glob("*/network_train/events.out.tfevents.*"))
    assert run.checks and all("every module matched" in c for c in run.checks.values())

    monkeypatch.setitem(sys.modules, "wandb", None)
    status = manager.submit(RunRequest(small_run_config(data, "tab2", 1, log_with="wandb")))
    assert manager.wait(300)
    run = manager.run(status.id)
    assert (run.phase, run.error) == ("failed", "log_with wandb: the wandb package is not installed: pip install wandb")
