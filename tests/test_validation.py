"""Validation loss (sd-scripts' validation_split, validation_seed, validate_every_n_steps,
validate_every_n_epochs, max_validation_steps) and `python -m lora_train pick`.

The held-out images are computed here from sd-scripts' documented rule (library/train_util.py
split_train_val: the subset's paths sorted, shuffled by `random.seed(validation_seed)`, the first
ceil(n x (1 - split)) train), never from the code under test."""

from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_dataset
from test_training import Recorder as Events

from lora_train.demo import make_dataset as demo_dataset

from lora_train import cli
from lora_train.app import job
from lora_train.dataset.loader import TrainingData
from lora_train.errors import UserError
from lora_train.network.files import load_lora, save_lora
from lora_train.train import events as ev
from lora_train.train.config import TrainConfig
from lora_train.train.noise import NoiseOptions
from lora_train.train.observers import LossCsv, Scalars
from lora_train.train.validation import fixed_timesteps
from lora_train.tools import pick


def cfg(tmp_path, data, **values):
    base = {"train_data_dir": str(data), "output_dir": str(tmp_path / "out"), "output_name": "run", "resolution": "64",
            "network_dim": 4, "network_alpha": 4, "learning_rate": 1e-3, "train_batch_size": 2, "seed": 11}
    return TrainConfig().update(base | values, source="test")


def two_folders(root: Path) -> Path:
    """Two image folders (7 and 5 images) and a regularization-free layout: each folder is split on its own."""
    demo_dataset(root, trigger="aaa", count=7, repeats=1)
    demo_dataset(root, trigger="bbb", count=5, repeats=2, seed=1)
    return root


def expected_held_out(folder: Path, split: float, seed: int) -> set[str]:
    paths = sorted(str(p) for p in folder.glob("*.png"))
    random.seed(seed)  # sd-scripts seeds Python's global random for the shuffle
    random.shuffle(paths)
    return set(paths[math.ceil(len(paths) * (1 - split)):])


def validations(events) -> list[tuple[int, str, float]]:
    return [(e.step, e.kind, e.loss) for e in events.of(ev.Validation)]


# ------------------------------------------------------------------------------------------ split
def test_the_split_follows_sd_scripts_rule_per_folder(tmp_path):
    data = two_folders(tmp_path / "data")
    plan = job.plan_dataset(cfg(tmp_path, data, validation_split=0.3, validation_seed=5, max_train_epochs=1))
    want = expected_held_out(data / "1_aaa", 0.3, 5) | expected_held_out(data / "2_bbb", 0.3, 5)
    assert len(want) == 2 + 1  # 7 - ceil(4.9), 5 - ceil(3.5)
    assert {str(i.path) for i in plan.validation} == want
    assert not {str(i.path) for i in plan.items} & want
    assert plan.train_images == 12 - 3 and plan.to_dict()["validation_images"] == 3
    from lora_train.ui.chart import plan_html
    from lora_train.ui.i18n import Translator

    assert "<th>Held-out images (validation_split)</th><td>3</td>" in plan_html(plan, Translator())
    # without validation_seed the run's seed picks them
    by_seed = job.plan_dataset(cfg(tmp_path, data, validation_split=0.3, seed=5, max_train_epochs=1))
    assert {str(i.path) for i in by_seed.validation} == want
    other = job.plan_dataset(cfg(tmp_path, data, validation_split=0.3, validation_seed=6, max_train_epochs=1))
    assert {str(i.path) for i in other.validation} != want
    # sd-scripts keeps ceil(10 x 0.65) = 7 to train and takes the last round(3.5) = 4 to validate, one of which
    # also trains; here the held-out images are the 3 that do not train
    ten = make_dataset(tmp_path / "ten", count=10, repeats=1)
    plan = job.plan_dataset(cfg(tmp_path, ten, validation_split=0.35, validation_seed=1, max_train_epochs=1))
    assert (plan.train_images, len(plan.validation)) == (7, 3)


def test_a_dataset_toml_sets_its_own_split_and_reg_images_are_not_split(tmp_path):
    data = two_folders(tmp_path / "data")
    reg = demo_dataset(tmp_path / "reg", trigger="person", count=4, repeats=1)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""[general]
validation_seed = 9
[[datasets]]
validation_split = 0.5
  [[datasets.subsets]]
  image_dir = '{data / "1_aaa"}'
  [[datasets.subsets]]
  image_dir = '{reg / "1_person"}'
  is_reg = true
""", encoding="utf-8")
    plan = job.plan_dataset(cfg(tmp_path, data, dataset_config=str(toml), max_train_epochs=1))
    assert {str(i.path) for i in plan.validation} == expected_held_out(data / "1_aaa", 0.5, 9)
    assert plan.reg_images == 4
    with pytest.raises(UserError, match="validation_split must be a fraction"):
        job.plan_dataset(cfg(tmp_path, data, validation_split=1.0, max_train_epochs=1))


def test_fixed_timesteps_are_sd_scripts():
    # np.linspace(min, max, 6, dtype=int)[1:-1], by hand
    assert fixed_timesteps(NoiseOptions(), 1000) == [200, 400, 600, 800]
    assert fixed_timesteps(NoiseOptions(min_timestep=100, max_timestep=900), 1000) == [260, 420, 580, 740]


def test_held_out_images_never_train(tiny_adapter, tmp_path, monkeypatch):
    data = two_folders(tmp_path / "data")
    loads: list[tuple[bool, list[str]]] = []
    original = TrainingData.draw  # every batch's images are drawn here, trained (by the threaded feed) or held out

    def draw(self, items, epoch, rng, step=0, validation=False):
        loads.append((validation, [str(i.path) for i in items]))
        return original(self, items, epoch, rng, step, validation)

    monkeypatch.setattr(TrainingData, "draw", draw)
    events = Events()
    job.build_trainer(cfg(tmp_path, data, validation_split=0.3, validation_seed=5, max_train_epochs=2, validate_every_n_steps=3),
                      tiny_adapter).run(events)
    held = expected_held_out(data / "1_aaa", 0.3, 5) | expected_held_out(data / "2_bbb", 0.3, 5)
    trained = {p for v, paths in loads if not v for p in paths}
    scored = {p for v, paths in loads if v for p in paths}
    assert trained == {str(p) for p in data.rglob("*.png")} - held
    assert scored == held
    steps = [e.step for e in events.of(ev.Step)]
    assert [(s, k) for s, k, _ in validations(events)] == [
        *[(s, "step") for s in steps if s % 3 == 0 and s <= steps[-1] // 2],
        (steps[-1] // 2, "epoch"),
        *[(s, "step") for s in steps if s % 3 == 0 and s > steps[-1] // 2],
        (steps[-1], "epoch")]


# ------------------------------------------------------------------------------------------ the run
def test_validation_leaves_the_trained_lora_bit_identical_and_pick_names_its_lowest_epoch(tiny_adapter, tmp_path):
    data = make_dataset(tmp_path / "data", count=6, repeats=2)
    extra = {"validation_split": 0.34, "max_train_epochs": 4, "save_every_n_epochs": 1, "shuffle_caption": True, "flip_aug": True,
             "network_dropout": 0.2, "noise_offset": 0.05, "learning_rate": 5e-3}
    plain = job.build_trainer(cfg(tmp_path / "a", data, max_validation_steps=0, **extra), tiny_adapter).run()
    events = Events()
    csv = LossCsv(tmp_path / "b" / "out" / "run-loss.csv")
    scored = job.build_trainer(cfg(tmp_path / "b", data, validate_every_n_steps=1, **extra), tiny_adapter).run(
        lambda e: (events(e), csv(e)))
    a, b = load_lora(plain)[0], load_lora(scored)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    per_epoch = {e.epoch: (e.step, e.loss) for e in events.of(ev.Validation) if e.kind == "epoch"}
    assert sorted(per_epoch) == [1, 2, 3, 4]
    assert len({v for _, v in per_epoch.values()}) == 4  # the weights change, so does the loss
    # pick: the saves are epochs 1-3 and the final file (epoch 4); the lowest of the event values wins
    best_epoch = min(per_epoch, key=lambda n: per_epoch[n][1])
    ranking = pick.rank(tmp_path / "b" / "out")
    want = "run.safetensors" if best_epoch == 4 else f"run-{best_epoch:06d}.safetensors"
    assert ranking.best.file.name == want
    assert [round(s.loss, 6) for s in ranking.saves] == sorted(round(v, 6) for _, v in per_epoch.values())


def test_the_validation_curve_is_the_same_after_stop_and_resume(tiny_adapter, tmp_path):
    data = make_dataset(tmp_path / "data", count=6, repeats=2)
    extra = {"validation_split": 0.34, "validation_seed": 3, "max_train_epochs": 3, "validate_every_n_steps": 2,
             "network_dropout": 0.2, "flip_aug": True}
    full = Events()
    job.build_trainer(cfg(tmp_path / "a", data, **extra), tiny_adapter).run(full)
    cancel = threading.Event()
    first, second = Events(), Events()
    csv_path = tmp_path / "b" / "out" / "run-loss.csv"
    csv = LossCsv(csv_path)

    def stop_at_5(e):
        first(e)
        csv(e)
        if isinstance(e, ev.Step) and e.step == 5:  # inside the second epoch (4 steps an epoch)
            cancel.set()

    path = job.build_trainer(cfg(tmp_path / "b", data, **extra), tiny_adapter).run(stop_at_5, cancel)
    state = path.with_name("run-interrupted-state")
    csv = LossCsv(csv_path)
    job.build_trainer(cfg(tmp_path / "b", data, resume=str(state), **extra), tiny_adapter).run(lambda e: (second(e), csv(e)))
    assert validations(first) + validations(second) == validations(full)
    assert validations(second)  # the resumed part really validated
    rows = [line.split(",") for line in csv_path.read_text(encoding="utf-8").splitlines()[1:]]
    assert [int(r[0]) for r in rows] == list(range(1, 13))  # the steps before the stop are kept
    from_csv = [(int(r[0]), kind, float(v)) for r in rows for kind, v in (("step", r[8]), ("epoch", r[9])) if v]
    assert [(s, k, round(v, 6)) for s, k, v in validations(full)] == [(s, k, round(v, 6)) for s, k, v in from_csv]


def test_scalars_use_sd_scripts_names():
    written: list[tuple[str, dict, int]] = []

    class Capture(Scalars):
        def write(self, values, step):
            written.append(("step", values, step))

        def write_epoch(self, values, epoch):
            written.append(("epoch", values, epoch))

    s = Capture()
    for e in (ev.Step(1, 1, 0.5, {}), ev.Step(2, 1, 0.25, {}), ev.Validation(2, 1, 0.4, "step"), ev.Validation(2, 1, 0.4, "epoch"),
              ev.EpochEnd(1, 0.375)):
        s(e)
    assert written[2] == ("step", {"loss/validation/step_average": 0.4, "loss/validation/step_divergence": 0.4 - 0.375}, 2)
    assert written[3] == ("epoch", {"loss/validation/epoch_average": 0.4, "loss/validation/epoch_divergence": 0.4 - 0.375}, 1)
    assert written[4] == ("epoch", {"loss/epoch": 0.375}, 1)


def test_validation_keys_without_a_split_are_noted(tiny_adapter, tmp_path):
    data = make_dataset(tmp_path / "data", count=2, repeats=1)
    trainer = job.build_trainer(cfg(tmp_path, data, max_train_steps=1, validate_every_n_steps=5), tiny_adapter)
    trainer._check_config()
    assert "validate_every_n_steps: read only with validation_split" in trainer.notes
    with pytest.raises(UserError, match="validate_every_n_epochs must be at least 1"):
        job.build_trainer(cfg(tmp_path, data, max_train_steps=1, validate_every_n_epochs=-1), tiny_adapter)._check_config()


# ------------------------------------------------------------------------------------------ pick
def _save(folder: Path, name: str, **metadata) -> Path:
    return save_lora(folder / name, {"lora_unet_x.alpha": torch.tensor(1.0)}, {k: str(v) for k, v in metadata.items()})


def test_pick_names_the_epoch_with_the_lowest_validation_loss(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "style-loss.csv").write_text(
        "step,epoch,loss,lr_unet,lr_textencoder,keys_scaled,average_key_norm,max_key_norm,validation_step_average,validation_epoch_average\n"
        "5,1,0.2,,,,,,0.30,\n10,1,0.2,,,,,,,0.25\n15,2,0.2,,,,,,0.5,\n20,2,0.2,,,,,,0.21,0.21\n"
        "25,3,0.2,,,,,,,\n30,3,0.2,,,,,,,0.23\n40,4,0.2,,,,,,,0.27\n", encoding="utf-8")
    _save(out, "style-000001.safetensors", ss_output_name="style", ss_epoch=1, ss_steps=10)
    _save(out, "style-000002.safetensors", ss_output_name="style", ss_epoch=2, ss_steps=20)
    _save(out, "style-000003.safetensors")  # no_metadata: its epoch's average
    _save(out, "style.safetensors", ss_output_name="style", ss_epoch=4, ss_steps=40)
    _save(out, "other-000001.safetensors", ss_output_name="other", ss_epoch=1, ss_steps=10)  # another run's file
    sample = out / "sample"
    sample.mkdir()
    for stem in ("style_e000002_s000020_00_7", "style_e000002_s000020_01_7", "style_e000001_s000010_00_7"):
        from PIL import Image

        Image.new("RGB", (8, 8), "red").save(sample / f"{stem}.png")
    ranking = pick.rank(out)
    assert [(s.file.name, s.loss) for s in ranking.saves] == [
        ("style-000002.safetensors", 0.21), ("style-000003.safetensors", 0.23), ("style-000001.safetensors", 0.25),
        ("style.safetensors", 0.27)]
    assert [p.name for p in ranking.best.previews] == ["style_e000002_s000020_00_7.png", "style_e000002_s000020_01_7.png"]
    assert cli.main(["pick", str(out / "style-000001.safetensors"), "--grid", str(tmp_path / "grid.png")]) == 0
    printed = capsys.readouterr().out
    assert f"suggested: {out / 'style-000002.safetensors'}" in printed
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (2 * 256, 20 + 2 * 256)  # two saves with previews, two prompts


def test_pick_without_validation_says_to_set_validation_split(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plain-loss.csv").write_text("step,epoch,loss,lr_unet,lr_textencoder,keys_scaled,average_key_norm,max_key_norm\n"
                                        "1,1,0.2,,,,,\n", encoding="utf-8")
    _save(out, "plain.safetensors", ss_epoch=1, ss_steps=1)
    assert cli.main(["pick", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set validation_split" in err[0]


def test_the_live_chart_draws_the_validation_loss_as_a_second_line():
    from lora_train.ui import chart

    svg = chart.loss_chart([(1, 0.5), (2, 0.4), (3, 0.45), (4, 0.3)], lambda s: s, validation=[(2, 0.6), (4, 0.55)])
    assert 'id="lora_train_chart_validation" data-points="2"' in svg and "validation loss" in svg
    assert "lora_train_chart_validation" not in chart.loss_chart([(1, 0.5), (2, 0.4)], lambda s: s)
