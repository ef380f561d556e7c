"""The Dataset tab's logic without gradio (tagging/session.py) and the `tags` CLI on the same store."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_train.access import AccessPolicy
from lora_train.cli import main
from lora_train.errors import UserError
from lora_train.tagging import session as session_module
from lora_train.tagging.session import PAGE, THUMB, DatasetSession
from lora_train.ui.dataset_tab import send_to_train_values

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}


def _make(root: Path, n: int = 6, size=(600, 400)) -> Path:
    folder = root / "10_zkz"
    folder.mkdir(parents=True)
    for i in range(n):
        colour = "red" if i % 2 == 0 else "blue"
        Image.new("RGB", size, COLOURS[colour]).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"1girl, {colour} dress" + (", smile" if i < 3 else ""), encoding="utf-8")
    return root


def _colour_tagger(images):
    """A deterministic stand-in tagger for merge-mode tests: names the image's dominant colour."""
    out = []
    for im in images:
        r, g, b = im.convert("RGB").getpixel((0, 0))
        out.append(["red" if r > b else "blue", "solo"])
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.txt")) if ".lora_train" not in p.parts}


def test_load_filter_page_and_thumbnails(tmp_path):
    _make(tmp_path, n=PAGE + 5)
    s = DatasetSession()
    assert f"{PAGE + 5} images" in s.load(str(tmp_path))
    assert s.pages() == 2 and len(s.gallery()) == PAGE
    s.page = 1
    assert len(s.gallery()) == 5
    thumbs = [im for im, _ in s.gallery()]
    assert all(max(im.size) <= THUMB for im in thumbs)  # never the 600 px original
    assert s.thumbnail(PAGE + 4) is s.thumbnail(PAGE + 4)  # kept, not decoded again
    s.set_filter(all_of=["1girl", "red dress"], none_of=["smile"])
    assert all("red dress" in s.store.tags(i) and "smile" not in s.store.tags(i) for i in s.visible())
    assert len(s.visible()) == (PAGE + 5 + 1) // 2 - 2
    assert dict(s.tag_counts())["red dress"] == len(s.visible()) and "blue dress" not in dict(s.tag_counts())


def test_batch_preview_changes_nothing_apply_changes_only_the_filtered_and_undo_save_restores(tmp_path):
    _make(tmp_path)
    before = _files(tmp_path)
    s = DatasetSession()
    s.load(str(tmp_path))
    s.set_filter(all_of=["blue dress"])
    text, diffs = s.batch("add front", "zkz", dry_run=True)
    assert "3 of 3" in text and len(diffs) == 3 and not s.store.dirty
    _, applied = s.batch("add front", "zkz")
    assert [(i, b, a) for i, b, a in applied] == [(i, b, a) for i, b, a in diffs]  # what the preview showed
    assert {i for i in s.store.dirty} == set(s.visible())
    assert all(s.store.tags(i)[0] == "zkz" for i in s.visible())
    s.set_filter()
    assert sum(s.store.tags(i)[:1] == ("zkz",) for i in s.visible()) == 3
    assert s.undo().startswith("undone") and not s.store.dirty
    s.redo()
    s.save()
    assert _files(tmp_path) != before
    s.batch("remove", "smile")
    with pytest.raises(UserError, match="unsaved"):
        s.undo_save()
    s.undo()
    assert "undid the save" in s.undo_save()
    assert _files(tmp_path) == before and len(s.store) == 6


def test_autotag_modes_and_cancel(tmp_path):
    _make(tmp_path)
    (tmp_path / "10_zkz" / "00.txt").write_text("", encoding="utf-8")
    s = DatasetSession()
    s.load(str(tmp_path))
    change = s.autotag(_colour_tagger, "prefill", batch_size=4)
    assert [d[0] for d in change.diffs] == [0] and s.store.tags(0) == ("red", "solo")
    s.autotag(_colour_tagger, "append")
    assert s.store.tags(1) == ("1girl", "blue dress", "smile", "blue", "solo")
    calls = []
    with pytest.raises(UserError, match="cancelled after 2 of 6"):
        s.autotag(_colour_tagger, "overwrite", batch_size=2, progress=lambda d, n: calls.append((d, n)), cancel=lambda: bool(calls))
    assert calls == [(2, 6)] and s.store.tags(1) == ("1girl", "blue dress", "smile", "blue", "solo")  # nothing kept
    with pytest.raises(UserError, match="unknown mode"):
        s.autotag(_colour_tagger, "merge")


def test_moves_are_refused_when_listening_and_folders_outside_the_roots_too(tmp_path):
    root = _make(tmp_path / "train")
    elsewhere = _make(tmp_path / "elsewhere")
    s = DatasetSession(AccessPolicy.build([root], remote=True))
    with pytest.raises(UserError, match="outside the allowed folders"):
        s.load(str(elsewhere))
    s.load(str(root))
    with pytest.raises(UserError, match="moving images is not allowed"):
        s.move("5_other")
    local = DatasetSession(AccessPolicy.build([root]))
    local.load(str(elsewhere))
    local.set_filter(all_of=["smile"])
    assert "move 3 image(s)" in local.move("5_other")
    local.save()
    assert len(list((elsewhere / "5_other").glob("*.png"))) == 3 and len(list((elsewhere / "5_other").glob("*.txt"))) == 3


def test_listening_saves_captions_only_with_caption_extensions(tmp_path):
    """Captions are written as <image name><extension>: where strangers type paths, '.sh' is no caption."""
    root = _make(tmp_path / "train")
    s = DatasetSession(AccessPolicy.build([root], remote=True))
    for ext in (".sh", ".py", ".bat"):
        with pytest.raises(UserError, match=f"caption extension '{ext}'"):
            s.load(str(root), ext)
    assert s.store is None and not list(root.rglob("*.sh"))
    s.load(str(root), ".caption")
    assert "images in" in DatasetSession(AccessPolicy.build([root])).load(str(root), ".sh"), "locally the user's own choice"


@pytest.mark.gradio
def test_send_to_train_gives_the_folder_above_the_concept_folders_and_a_shared_first_tag(tmp_path):
    _make(tmp_path)
    s = DatasetSession()
    s.load(str(tmp_path / "10_zkz"))
    assert send_to_train_values(s) == (str(tmp_path.resolve()), "1girl")
    s.load(str(tmp_path))
    s.store.set_caption(0, "other, 1girl")
    assert send_to_train_values(s) == (str(tmp_path.resolve()), "")


def test_tags_cli_edits_dry_runs_and_undoes_byte_for_byte(tmp_path, capsys):
    _make(tmp_path)
    before = _files(tmp_path)
    assert main(["tags", str(tmp_path), "--add-front", "zkz", "--where", "smile", "--dry-run"]) == 0
    assert "3 caption(s) would change" in capsys.readouterr().out and _files(tmp_path) == before
    assert main(["tags", str(tmp_path), "--add-front", "zkz", "--where", "smile"]) == 0
    after = _files(tmp_path)
    assert sum(v.startswith(b"zkz, ") for v in after.values()) == 3
    assert main(["tags", str(tmp_path), "--replace", "red dress=gown", "--where-not", "smile"]) == 0
    assert main(["tags", str(tmp_path), "--undo"]) == 0 and _files(tmp_path) == after
    assert main(["tags", str(tmp_path), "--undo"]) == 0 and _files(tmp_path) == before
    assert main(["tags", str(tmp_path), "--undo"]) == 2
    assert "nothing to undo" in capsys.readouterr().err
    assert main(["tags", str(tmp_path), "--replace", "no-equals-sign"]) == 2
    assert main(["tags", str(tmp_path), "--replace", "(=x", "--regex"]) == 2
    assert "bad regular expression" in capsys.readouterr().err
    assert main(["tags", str(tmp_path / "missing"), "--dedupe"]) == 2
    main(["tags", str(tmp_path), "--list"])
    listed = capsys.readouterr().out.split("\n")
    assert listed[0].split() == ["6", "1girl"]


def test_check_reports_problems_and_trigger_coverage_of_the_saved_files(tmp_path):
    _make(tmp_path)
    (tmp_path / "10_zkz" / "bad.png").write_bytes(b"not a png")
    s = DatasetSession()
    s.load(str(tmp_path))
    s.store.add("zkz", [0, 1])
    s.save()
    s.store.add("zkz", [2])  # unsaved
    report = s.check("64", "zkz", tokens=False)
    assert "bad.png" in report and "steps:" in report
    assert "trigger 'zkz': first tag in 3 of 7 captions, present in 3" in report
    assert "1 image(s) have unsaved edits" in report


def test_prepare_writes_a_new_folder_and_loads_it_leaving_the_originals(tmp_path):
    src = _make(tmp_path / "src")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    s = DatasetSession(AccessPolicy.build([tmp_path], remote=True))
    s.load(str(src))
    with pytest.raises(UserError, match="outside the allowed folders"):
        s.prepare("/elsewhere/out", "512x512")
    assert "loaded" in s.prepare(str(tmp_path / "out"), "256x256", "center")
    assert s.store.root == (tmp_path / "out").resolve() and len(s.store) == 6
    assert all(Image.open(s.store.image_path(i)).size == (256, 256) for i in range(6))
    assert s.store.tags(0) == ("1girl", "red dress", "smile")  # captions came along
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    s.store.add("x")
    with pytest.raises(UserError, match="save the caption edits first"):
        s.prepare(str(tmp_path / "out2"), "256x256")


def test_autotag_cli_with_a_tiny_blip_prefills_empty_captions_and_undoes(tmp_path, capsys):
    from test_blip import _build

    model = _build(tmp_path / "blip", sep_bias=6.0)
    data = _make(tmp_path / "data", n=4)
    (data / "10_zkz" / "01.txt").unlink()
    (data / "10_zkz" / "03.txt").write_text("", encoding="utf-8")
    before = _files(data)
    assert main(["autotag", str(data), "--blip", "--model", str(model), "--dry-run"]) == 0
    assert "2 caption(s) would change" in capsys.readouterr().out and _files(data) == before
    assert main(["autotag", str(data), "--blip", "--model", str(model)]) == 0
    after = _files(data)
    assert after["10_zkz/01.txt"] and after["10_zkz/03.txt"]  # filled
    assert all(after[k] == before[k] for k in ("10_zkz/00.txt", "10_zkz/02.txt"))  # prefill leaves captioned ones
    assert main(["tags", str(data), "--undo"]) == 0
    assert _files(data) == before and not (data / "10_zkz" / "01.txt").exists()


def test_truncate_cuts_whole_tags_to_the_clip_token_budget(tmp_path):
    from lora_train.dataset.captions import count_tokens
    from lora_train.model.clip_files import clip_l_tokenizer

    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    tags = [f"tag number {i}" for i in range(40)]  # 3-4 tokens each, with the comma ~4-5
    (folder / "a.txt").write_text(", ".join(tags), encoding="utf-8")
    s = DatasetSession()
    s.load(str(tmp_path))
    s.batch("truncate to tokens", "75")
    kept = s.store.tags(0)
    tok = clip_l_tokenizer()
    assert count_tokens(", ".join(kept), tok) <= 75 < count_tokens(", ".join(tags[:len(kept) + 1]), tok)
    assert kept == tuple(tags[:len(kept)])  # whole tags, from the end
    with pytest.raises(UserError, match="whole number"):
        s.batch("truncate to tokens", "lots")


def test_thumbnails_held_in_memory_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "THUMBS_KEPT", 5)
    _make(tmp_path, n=8, size=(64, 64))
    s = DatasetSession()
    s.load(str(tmp_path))
    first = s.thumbnail(0)
    for i in range(1, 8):
        s.thumbnail(i)
    assert len(s._thumbs) == 5 and s.thumbnail(0) is not first  # the oldest went first
