"""The tag store: every operation and its undo, saves that can be undone to the byte, crashes
mid-save that leave each caption old or new, and encodings kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from lora_train.dataset import captions as cap
from lora_train.errors import UserError
from lora_train.tagging import journal
from lora_train.tagging.store import TagStore


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)


def _dataset(root: Path) -> dict[str, bytes]:
    """Two concept folders; captions in UTF-8, UTF-8 with BOM, GBK, UTF-16 LE with BOM, CRLF with a
    second (wildcard) line, one without caption, one unreadable."""
    files = {
        "10_alice/a.png": None, "10_alice/a.txt": "1girl, long hair, smile".encode("utf-8"),
        "10_alice/b.png": None, "10_alice/b.txt": "\ufeff1girl, short hair, smile, smile".encode("utf-8"),
        "10_alice/c.png": None, "10_alice/c.txt": "1girl, 红色, smile".encode("gbk"),
        "10_alice/d.png": None, "10_alice/d.txt": cap.encode_caption("1boy, 帽子, outdoors", "utf-16-le-sig"),
        "5_bob/e.png": None, "5_bob/e.txt": b"1boy, outdoors\r\n{1boy|man}, outdoors\r\n",
        "5_bob/f.png": None,  # no caption yet
        "5_bob/g.png": None, "5_bob/g.txt": b"\x00\x01\x02binary\x00",
        "5_bob/notes.md": b"not an image",
    }
    out = {}
    for rel, data in files.items():
        path = root / rel
        if data is None:
            _image(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        out[rel] = path.read_bytes()
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".lora_train" not in p.parts}


@pytest.fixture
def store(tmp_path):
    _dataset(tmp_path)
    return TagStore.load(tmp_path)


def _index(store: TagStore, name: str) -> int:
    return next(i for i, e in enumerate(store.entries) if e.name == name)


def test_load_reads_every_encoding_and_marks_unreadable_captions_read_only(store, tmp_path):
    assert [e.name for e in store.entries] == [f"{c}.png" for c in "abcdefg"]  # notes.md is not an image
    assert store.tags(_index(store, "c.png")) == ("1girl", "红色", "smile")
    assert store.tags(_index(store, "d.png")) == ("1boy", "帽子", "outdoors")
    assert store.tags(_index(store, "e.png")) == ("1boy", "outdoors")
    assert store.tags(_index(store, "f.png")) == ()
    g = _index(store, "g.png")
    assert store.entries[g].error and any("g.txt" in p and "read-only" in p for p in store.problems)
    assert store.frequencies()["1girl"] == 3 and store.frequencies()["smile"] == 3  # b has smile twice: one image
    assert store.folders() == {"10_alice": {"images": 4, "repeats": 10}, "5_bob": {"images": 3, "repeats": 5}}


def test_filters_and_up_to_date_frequencies(store):
    assert [store.entries[i].name for i in store.select(all_of=["1girl", "smile"], none_of=["short hair"])] == ["a.png", "c.png"]
    assert [store.entries[i].name for i in store.select(any_of=["1boy", "short hair"])] == ["b.png", "d.png", "e.png"]
    assert [store.entries[i].name for i in store.select(search="HAIR")] == ["a.png", "b.png"]
    assert [store.entries[i].name for i in store.select(folder="5_bob")] == ["e.png", "f.png", "g.png"]
    store.remove(["smile"], store.select(all_of=["long hair"]))
    assert store.frequencies()["smile"] == 2 and store.images_with("smile") == [_index(store, "b.png"), _index(store, "c.png")]
    store.add(["zkz"], store.select(all_of=["1girl"]))
    assert store.frequencies()["zkz"] == 3
    assert store.frequencies(store.select(folder="10_alice"))["1boy"] == 1
    store.undo()
    assert "zkz" not in store.frequencies() and store.select(all_of=["zkz"]) == []


OPERATIONS = {
    "add front (trigger)": lambda s: s.add(["zkz", "smile"], s.select(all_of=["1girl"])),
    "add back": lambda s: s.add("masterpiece", front=False),
    "remove": lambda s: s.remove(["smile", "outdoors"]),
    "replace": lambda s: s.replace("long hair", "very long hair, ponytail"),
    "replace regex": lambda s: s.replace(r"^(\w+) hair$", r"hair \1", regex=True),
    "replace to nothing": lambda s: s.replace("1girl", ""),
    "dedupe": lambda s: s.dedupe(),
    "sort alpha, keep 1": lambda s: s.sort(by="alpha", keep=1),
    "sort by frequency": lambda s: s.sort(by="frequency"),
    "truncate": lambda s: s.truncate(2, lambda text: len(text.split(","))),
    "edit one": lambda s: s.set_caption(_index(s, "a.png"), "zkz, 1girl, hat"),
    "auto-tag prefill": lambda s: s.merge_generated({i: ["tagged", "1girl"] for i in range(len(s))}, "prefill"),
    "auto-tag prepend": lambda s: s.merge_generated({i: ["tagged", "1girl"] for i in range(len(s))}, "prepend"),
    "move": lambda s: s.move([_index(s, "a.png"), _index(s, "f.png")], "3_carol"),
    "set repeats": lambda s: s.set_repeats("10_alice", 2),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_operation_saved_then_undone_restores_every_file_byte_for_byte(name, tmp_path):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    change = OPERATIONS[name](store)
    assert change is not None and change.diffs, "the operation changed nothing: the test would prove nothing"
    assert store.entries[_index(store, "g.png")].state.tags == ()  # unreadable: never edited
    store.save()
    after_save = _snapshot(tmp_path)
    assert after_save != before
    assert after_save["5_bob/g.txt" if "5_bob/g.txt" in after_save else "2_bob/g.txt"] == before["5_bob/g.txt"]
    # the edit is what a fresh load sees
    reloaded = TagStore.load(tmp_path)
    assert sorted((e.state.folder, e.name, e.state.tags) for e in reloaded.entries) == \
        sorted((e.state.folder, e.name, e.state.tags) for e in store.entries)
    journal.undo(tmp_path)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_operation_undone_in_memory_restores_tags_and_nothing_is_written(name, tmp_path):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    original = [e.state for e in store.entries]
    freq = store.frequencies()
    OPERATIONS[name](store)
    edited = [e.state for e in store.entries]
    store.undo()
    assert [e.state for e in store.entries] == original and store.frequencies() == freq and not store.dirty
    store.redo()
    assert [e.state for e in store.entries] == edited
    assert _snapshot(tmp_path) == before  # nothing touches the disk before save


def test_operation_results(store):
    a, b, e, f = (_index(store, n) for n in ("a.png", "b.png", "e.png", "f.png"))
    store.add(["zkz", "smile"], [a, b])
    assert store.tags(a) == ("zkz", "smile", "1girl", "long hair")  # moved to the front, not doubled
    store.replace("long hair", "very long hair, smile")
    assert store.tags(a) == ("zkz", "smile", "1girl", "very long hair")
    store.replace(r"^(\w+) hair$", r"\1-hair", regex=True)
    assert store.tags(b) == ("zkz", "smile", "1girl", "short-hair")
    store.sort(by="frequency", keep=1)
    assert store.tags(a)[0] == "zkz" and store.tags(a)[1] == "1girl"  # 1girl in 3 images, smile in 3: alphabetical tie
    store.merge_generated({e: ["x"], f: ["y", "y"]}, "prefill")
    assert store.tags(e) == ("1boy", "outdoors") and store.tags(f) == ("y",)
    store.merge_generated({e: ["x", "1boy"]}, "append")
    assert store.tags(e) == ("1boy", "outdoors", "x")
    with pytest.raises(UserError, match="bad regular expression"):
        store.replace("(", "x", regex=True)
    with pytest.raises(UserError, match="unknown mode"):
        store.merge_generated({e: ["x"]}, "merge")
    with pytest.raises(UserError, match="plain name"):
        store.move([a], "../outside")
    (store.root / "3_bob").mkdir()
    with pytest.raises(UserError, match="that folder exists"):
        store.set_repeats("5_bob", 3)
    with pytest.raises(UserError, match="an image of that name"):
        _image(store.root / "6_dave/a.png")
        store.move([a], "6_dave")


def test_unchanged_files_are_not_rewritten_and_encodings_and_other_lines_are_kept(tmp_path):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    old = {p: os.stat(tmp_path / p).st_mtime_ns for p in before}
    store.add("zkz", store.select(any_of=["红色", "帽子", "outdoors"]))
    store.remove("smile", store.select(all_of=["long hair"]))
    store.undo()  # net: nothing for a.txt
    store.save()
    after = _snapshot(tmp_path)
    written = {p for p in before if after.get(p) != before[p]}
    assert written == {"10_alice/c.txt", "10_alice/d.txt", "5_bob/e.txt"}
    assert all(os.stat(tmp_path / p).st_mtime_ns == old[p] for p in before if p not in written)
    assert after["10_alice/c.txt"] == "zkz, 1girl, 红色, smile".encode("gbk")
    assert after["10_alice/d.txt"] == cap.encode_caption("zkz, 1boy, 帽子, outdoors", "utf-16-le-sig")
    assert after["5_bob/e.txt"] == b"zkz, 1boy, outdoors\r\n{1boy|man}, outdoors\r\n"


def test_a_tag_the_files_encoding_cannot_hold_stops_the_save_before_any_write(tmp_path):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    store.add("😀")  # not in GBK
    with pytest.raises(UserError, match=r"c\.txt.*nothing was saved"):
        store.save()
    assert _snapshot(tmp_path) == before


def test_saves_undo_newest_first_and_undo_refuses_to_lose_a_later_edit(tmp_path):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    store.add("one")
    store.save()
    after_one = _snapshot(tmp_path)
    store.add("two")
    store.save()
    assert [h["label"] for h in journal.history(tmp_path)] == ["add 'one' at the front", "add 'two' at the front"]
    journal.undo(tmp_path)
    assert _snapshot(tmp_path) == after_one
    (tmp_path / "10_alice/a.txt").write_text("edited by hand", encoding="utf-8")
    with pytest.raises(UserError, match=r"(?s)changed since.*a\.txt"):
        journal.undo(tmp_path)
    assert (tmp_path / "10_alice/a.txt").read_text(encoding="utf-8") == "edited by hand"  # nothing touched
    (tmp_path / "10_alice/a.txt").write_bytes(after_one["10_alice/a.txt"])
    journal.undo(tmp_path)
    assert _snapshot(tmp_path) == before
    with pytest.raises(UserError, match="nothing to undo"):
        journal.undo(tmp_path)


@pytest.mark.parametrize("crash_after", [0, 1, 2, 4])
def test_a_crash_between_writes_leaves_each_caption_old_or_new_and_undo_repairs_it(tmp_path, monkeypatch, crash_after):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    store.add("zkz")
    new = {journal_write.path: journal_write.data for journal_write in store.save_plan().writes}
    assert len(new) == 6  # every readable caption (f gets a new one)

    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        # the journal's own files go first; count only caption replacements
        if ".lora_train" not in str(dst):
            if len(calls) == crash_after:
                raise KeyboardInterrupt  # the process dies here
            calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        store.save()
    monkeypatch.setattr(os, "replace", real_replace)
    now = _snapshot(tmp_path)
    for rel, data in new.items():
        assert now.get(rel) in (before.get(rel), data), f"{rel} is neither old nor new"
    assert sum(now.get(rel) == data for rel, data in new.items()) == crash_after
    assert any("interrupted" in p for p in TagStore.load(tmp_path).problems)
    journal.undo(tmp_path)
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.endswith(".tmp")} == before


def test_set_repeats_renames_the_folder_with_files_the_store_does_not_know(tmp_path):
    before = _dataset(tmp_path)
    store = TagStore.load(tmp_path)
    store.set_repeats("5_bob", 3)
    assert store.folders()["3_bob"] == {"images": 3, "repeats": 3}
    store.save()
    assert (tmp_path / "3_bob/notes.md").is_file() and not (tmp_path / "5_bob").exists()
    journal.undo(tmp_path)
    assert _snapshot(tmp_path) == before
