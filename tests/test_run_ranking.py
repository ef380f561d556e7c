"""After a run with validation_split the Train tab ranks its saves (`pick`), stars the one with the
lowest validation loss, and that file's card (and the final file's) says which epoch and why; the
CLI's `train` prints the same ranking. The expected epoch is read here from the run's loss.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import make_dataset, small_run_config
from test_runs import TinyHost

from lora_train.app.runs import RunManager, RunRequest
from lora_train.cli import main
from lora_train.tools.cards import set_note
from lora_train.tools.pick import is_card_note
from lora_train.ui import chart
from lora_train.ui.i18n import Translator

VALIDATED = {"validation_split": 0.34, "learning_rate": 1e-1}


@pytest.fixture
def host(tmp_path, tiny_model):
    return TinyHost(tiny_model, tmp_path / "Lora", tmp_path / "runs")


def epoch_losses(loss_csv: Path) -> dict[int, float]:
    """epoch -> the validation loss of its end-of-epoch pass, straight from the csv."""
    with loss_csv.open(encoding="utf-8", newline="") as f:
        return {int(r["epoch"]): float(r["validation_epoch_average"]) for r in csv.DictReader(f) if r["validation_epoch_average"]}


def notes_of(lora: Path) -> str:
    return json.loads(lora.with_suffix(".json").read_text(encoding="utf-8"))["notes"]


def test_a_validated_run_stars_its_lowest_epoch_and_notes_it_on_the_cards(host, tmp_path):
    data = make_dataset(tmp_path / "data", count=6, repeats=1)
    manager = RunManager(host)
    status = manager.submit(RunRequest(small_run_config(data, "ranked", 3, **VALIDATED), trigger="zkz", preferred_weight=0.8,
                                       notes="my own notes", preview_prompts=["zkz --w 64 --h 64 --s 2"]))
    assert manager.wait(300)
    run = manager.run(status.id)
    assert run.phase == "finished", run.error
    losses = epoch_losses(Path(run.work_dir) / "ranked-loss.csv")
    assert sorted(losses) == [1, 2, 3] and len(set(losses.values())) == 3
    best = min(losses, key=losses.get)
    lora_dir = host.lora_dir()
    stem = "ranked" if best == 3 else f"ranked-{best:06d}"  # epoch 3 is the final file
    suggested = lora_dir / f"{stem}.safetensors"
    assert run.suggested == str(suggested)
    by_loss = sorted(losses, key=losses.get)
    files = {1: "ranked-000001", 2: "ranked-000002", 3: "ranked"}
    assert [(Path(f).name, e, round(v, 6)) for f, e, v in run.ranking] == [
        (f"{files[e]}.safetensors", e, round(losses[e], 6)) for e in by_loss]
    # the cards: the suggested and the final file say which epoch and why, under the user's notes
    note = f"suggested epoch {best} ({stem}): lowest validation loss {losses[best]:.4f} of 3 saves"
    for name in {stem, "ranked"}:
        card = json.loads((lora_dir / f"{name}.json").read_text(encoding="utf-8"))
        assert card["notes"] == f"my own notes\n{note}"
        assert card["activation text"] == "zkz" and card["preferred weight"] == 0.8 and card["sd version"] == "SD1"
        assert (lora_dir / f"{name}.preview.png").is_file()
    for name in set(files.values()) - {stem, "ranked"}:
        assert notes_of(lora_dir / f"{name}.safetensors") == "my own notes"
    # the run's own saves are never written to: the published copies are byte for byte the saves, and no card is there
    for name in files.values():
        assert (Path(run.work_dir) / f"{name}.safetensors").read_bytes() == (lora_dir / f"{name}.safetensors").read_bytes()
    assert not list(Path(run.work_dir).glob("*.json"))
    # the tab: one star, on the suggested file, in the list and the ranking
    shown = chart.files_html(run, Translator())
    assert shown.count('data-suggested="1"') == 1 and f'data-file="{suggested.name}" data-suggested="1"' in shown
    assert f"<code>{suggested.name}</code> <span title=\"lowest validation loss\">★</span>" in shown
    assert shown.count("★") == 2


def test_a_run_without_validation_has_no_ranking_and_no_note(host, tmp_path):
    data = make_dataset(tmp_path / "data", count=4, repeats=1)
    manager = RunManager(host)
    status = manager.submit(RunRequest(small_run_config(data, "plain", 2), notes="mine", previews=False))
    assert manager.wait(300)
    run = manager.run(status.id)
    assert run.phase == "finished", run.error
    assert run.ranking == [] and run.suggested == ""
    for path in run.published:
        assert notes_of(Path(path)) == "mine"
    shown = chart.files_html(run, Translator())
    assert "★" not in shown and "lora_train_ranking" not in shown


def test_a_later_ranking_replaces_the_note_and_keeps_the_rest_of_the_card(tmp_path):
    lora = tmp_path / "x.safetensors"
    fields = {"activation text": "zkz", "preferred weight": 0.7, "notes": "line one\nline two", "custom": "the editor's"}
    lora.with_suffix(".json").write_text(json.dumps(fields), encoding="utf-8")
    first = "suggested epoch 2 (x-000002): lowest validation loss 0.1000 of 2 saves"
    second = "suggested epoch 5 (x): lowest validation loss 0.0500 of 5 saves"
    assert set_note(lora, first, is_card_note)
    assert not set_note(lora, first, is_card_note), "the same note again changes nothing"
    assert set_note(lora, second, is_card_note)
    assert json.loads(lora.with_suffix(".json").read_text(encoding="utf-8")) == fields | {"notes": f"line one\nline two\n{second}"}
    assert set_note(lora, None, is_card_note)  # no longer the suggested file
    assert notes_of(lora) == "line one\nline two"


def test_the_cli_train_prints_the_ranking_when_there_is_validation_loss(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", count=6, repeats=1)
    out = tmp_path / "out"
    common = ["--set", "pretrained_model_name_or_path=builtin:tiny", "--set", f"train_data_dir={data}", "--set", f"output_dir={out}",
              "--set", "resolution=64", "--set", "max_train_epochs=2", "--set", "save_every_n_epochs=1", "--set", "network_dim=2",
              "--set", "train_batch_size=2", "--set", "seed=3"]
    assert main(["train", *common, "--set", "output_name=v", "--set", "validation_split=0.34", "--set", "learning_rate=5e-3"]) == 0
    printed = capsys.readouterr().out
    losses = epoch_losses(out / "v-loss.csv")
    best = min(losses, key=losses.get)
    want = out / ("v.safetensors" if best == 2 else f"v-{best:06d}.safetensors")
    assert f"suggested: {want} (the lowest validation loss, {losses[best]:.6f}, epoch {best}," in printed
    assert "run v: saves ranked by the loss on the held-out images" in printed
    assert not list(out.glob("*.json")), "the CLI publishes nothing, so it writes no card"
    assert main(["train", *common, "--set", "output_name=p"]) == 0
    printed = capsys.readouterr()
    assert "suggested" not in printed.out + printed.err and "validation" not in printed.out + printed.err


def test_a_tool_made_file_does_not_carry_the_sources_suggestion(tmp_path):
    """lbw / merge / resize copy the source card's notes under their own line: the source run's
    "suggested epoch" line is about the source, not the new file."""
    from lora_train.tools.cards import write_card

    source = tmp_path / "src.safetensors"
    source.with_suffix(".json").write_text(json.dumps({"activation text": "zkz", "notes": "my own note\n"
                                                       "suggested epoch 4 (src): lowest validation loss 0.2272 of 4 saves"}))
    card = json.loads(write_card(tmp_path / "src-lbw.safetensors", "sd1", "src.safetensors with the block weights OUTS", source).read_text())
    assert card["notes"] == "src.safetensors with the block weights OUTS\nmy own note"
    assert card["activation text"] == "zkz"
