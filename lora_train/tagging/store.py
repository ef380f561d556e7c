"""The tag store: a folder's images and caption tags in memory, edited by operations on a selection,
with undo/redo, and saved through the journal (only changed captions are written; every save can
be undone).

A caption's first non-empty line holds the tags (what sd-scripts trains on). Anything else in the
file, further lines (wildcard captions) and the line break style, is kept as it was. An unreadable
caption makes its image read-only here: no operation touches it, so it is never overwritten.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lora_train.dataset import captions as cap
from lora_train.dataset.images import IMAGE_EXTENSIONS
from lora_train.errors import UserError, msg
from lora_train.tagging import journal, ops
from lora_train.tagging.ops import Tags

_FIRST_LINE = re.compile(r"^(\s*?)([^\r\n]*)(.*)$", re.S)
_REPEATS = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class State:
    """What an operation changes about one image: its tags and the folder it lives in."""

    tags: Tags
    folder: str  # relative to the root, "" = the root itself


@dataclass
class Entry:
    name: str  # image file name
    state: State
    saved: State  # as on disk
    encoding: str = "utf-8"
    head: str = ""  # blank lines before the tag line, kept
    rest: str = ""  # the line break after the tag line and every later line, kept
    has_caption: bool = False
    error: str | None = None  # unreadable caption: read-only

    def image(self, state: State | None = None) -> str:
        folder = (state or self.state).folder
        return f"{folder}/{self.name}" if folder else self.name

    @property
    def changed(self) -> bool:
        return self.state != self.saved


@dataclass
class Change:
    label: str
    diffs: list[tuple[int, State, State]]  # (index, before, after)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


class TagStore:
    def __init__(self, root: Path, caption_extension: str = ".txt"):
        self.root = Path(root)
        self.caption_extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        self.entries: list[Entry] = []
        self.problems: list[str] = []
        self._index: dict[str, set[int]] = {}
        self._undo: list[Change] = []
        self._redo: list[Change] = []
        self._saved_mark = 0  # len(self._undo) at the last save: what the next save's label lists

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, caption_extension: str = ".txt") -> "TagStore":
        root = Path(root)
        if not root.is_dir():
            raise UserError(msg("{path}: not a folder", path=root))
        store = cls(root.resolve(), caption_extension)
        store._scan()
        return store

    def _scan(self) -> None:
        for folder, dirs, files in _walk(self.root):
            rel_folder = _rel(folder, self.root) if folder != self.root else ""
            for name in files:
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    self.entries.append(self._read_entry(folder, rel_folder, name))
        for i, e in enumerate(self.entries):
            for t in set(e.state.tags):
                self._index.setdefault(t, set()).add(i)
        pending = [h for h in journal.history(self.root) if h.get("state") == "pending"]
        if pending:
            self.problems.append(msg("{entry}: a save was interrupted ('{operation}'); undo it or check the captions it names",
                                     entry=pending[-1]["entry"], operation=pending[-1]["label"]))

    def _read_entry(self, folder: Path, rel_folder: str, name: str) -> Entry:
        path = folder / (Path(name).stem + self.caption_extension)
        entry = Entry(name, State((), rel_folder), State((), rel_folder))
        if not path.is_file():
            return entry
        entry.has_caption = True
        try:
            text = cap.read_caption_text(path)
        except cap.CaptionError as e:
            entry.error = str(e)
            self.problems.append(msg("{path}: {error}; this image is read-only here", path=path, error=e))
            return entry
        head, line, rest = _FIRST_LINE.match(text.text).groups()
        entry.head, entry.rest, entry.encoding = head, rest, text.encoding
        entry.state = entry.saved = State(ops.split_tags(line), rel_folder)
        return entry

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, i: int) -> Path:
        return self.root / self.entries[i].image(self.entries[i].saved)  # where it is on disk now

    def caption_path(self, i: int, state: State | None = None) -> Path:
        e = self.entries[i]
        return self.root / Path(e.image(state or e.saved)).with_suffix(self.caption_extension)

    def tags(self, i: int) -> Tags:
        return self.entries[i].state.tags

    def caption(self, i: int) -> str:
        return ops.join_tags(self.tags(i))

    def frequencies(self, indices: Iterable[int] | None = None) -> Counter:
        """Images per tag (a tag twice in one caption counts once), over `indices` or all."""
        if indices is None:
            return Counter({t: len(ix) for t, ix in self._index.items() if ix})
        wanted = set(indices)
        return Counter({t: len(ix & wanted) for t, ix in self._index.items() if ix & wanted})

    def images_with(self, tag: str) -> list[int]:
        return sorted(self._index.get(tag, ()))

    def select(self, all_of: Sequence[str] = (), any_of: Sequence[str] = (), none_of: Sequence[str] = (),
               search: str = "", folder: str | None = None) -> list[int]:
        """Indices whose tags hold every `all_of`, at least one `any_of` (when given), no `none_of`,
        whose caption contains `search` (case-insensitive), in `folder` when given."""
        chosen = set(range(len(self.entries)))
        for t in all_of:
            chosen &= self._index.get(t, set())
        if any_of:
            chosen &= set().union(*(self._index.get(t, set()) for t in any_of))
        for t in none_of:
            chosen -= self._index.get(t, set())
        if search:
            needle = search.casefold()
            chosen = {i for i in chosen if needle in self.caption(i).casefold() or needle in self.entries[i].name.casefold()}
        if folder is not None:
            chosen = {i for i in chosen if self.entries[i].state.folder == folder}
        return sorted(chosen)

    def folders(self) -> dict[str, dict]:
        """Concept folders as they will be after saving: images, and repeats from `<N>_name`."""
        out: dict[str, dict] = {}
        for e in self.entries:
            f = out.setdefault(e.state.folder, {"images": 0, "repeats": _repeats(e.state.folder)})
            f["images"] += 1
        return dict(sorted(out.items()))

    @property
    def dirty(self) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e.changed]

    # -- operations ---------------------------------------------------------------------------
    def _editable(self, indices: Iterable[int] | None) -> list[int]:
        indices = range(len(self.entries)) if indices is None else indices
        return [i for i in indices if self.entries[i].error is None]

    def preview(self, fn: Callable[[Tags], Sequence[str]], indices: Iterable[int] | None = None) -> list[tuple[int, Tags, Tags]]:
        """What `fn` would do to the tags of `indices`: (index, before, after) for each that changes."""
        out = []
        for i in self._editable(indices):
            before = self.entries[i].state.tags
            after = tuple(fn(before))
            if after != before:
                out.append((i, before, after))
        return out

    def apply(self, label: str, fn: Callable[[Tags], Sequence[str]], indices: Iterable[int] | None = None) -> Change | None:
        diffs = [(i, self.entries[i].state, State(after, self.entries[i].state.folder)) for i, _, after in self.preview(fn, indices)]
        return self._record(Change(label, diffs))

    def _record(self, change: Change) -> Change | None:
        if not change.diffs:
            return None
        for i, _, after in change.diffs:
            self._set(i, after)
        self._undo.append(change)
        self._redo.clear()
        return change

    def _set(self, i: int, state: State) -> None:
        e = self.entries[i]
        old, new = set(e.state.tags), set(state.tags)
        for t in old - new:
            ix = self._index[t]
            ix.discard(i)
            if not ix:
                del self._index[t]
        for t in new - old:
            self._index.setdefault(t, set()).add(i)
        e.state = state

    def add(self, tags: Sequence[str], indices=None, *, front: bool = True) -> Change | None:
        tags = _clean(tags)
        fn = (lambda t: ops.add_front(t, tags)) if front else (lambda t: ops.add_back(t, tags))
        listed = repr(ops.join_tags(tags))
        label = msg("add {tags} at the front", tags=listed) if front else msg("add {tags} at the end", tags=listed)
        return self.apply(label, fn, indices)

    def remove(self, tags: Sequence[str], indices=None) -> Change | None:
        tags = _clean(tags)
        return self.apply(msg("remove {tags}", tags=repr(ops.join_tags(tags))), lambda t: ops.remove(t, tags), indices)

    def replace(self, old: str, new: str, indices=None, *, regex: bool = False) -> Change | None:
        if regex:
            ops.compile_pattern(old)  # a bad pattern fails before anything is recorded
        return self.apply(msg("replace {old} with {new}", old=repr(old), new=repr(new)), lambda t: ops.replace(t, old, new, regex=regex),
                          indices)

    def dedupe(self, indices=None) -> Change | None:
        return self.apply(msg("remove duplicate tags"), ops.dedupe, indices)

    def sort(self, indices=None, *, by: str = "alpha", keep: int = 0) -> Change | None:
        freq = self.frequencies() if by == "frequency" else None
        ops.sort((), by=by)  # an unknown order fails before anything is recorded
        return self.apply(msg("sort tags ({order})", order=by), lambda t: ops.sort(t, by=by, keep=keep, frequency=freq), indices)

    def truncate(self, max_tokens: int, count: Callable[[str], int], indices=None) -> Change | None:
        return self.apply(msg("truncate to {budget} tokens", budget=max_tokens), lambda t: ops.truncate(t, max_tokens, count), indices)

    def set_caption(self, i: int, text: str) -> Change | None:
        tags = ops.split_tags(text.splitlines()[0] if text.strip() else "")
        return self.apply(msg("edit {name}", name=self.entries[i].name), lambda _: tags, [i])

    def merge_generated(self, generated: dict[int, Sequence[str]], mode: str) -> Change | None:
        ops.merge_generated((), (), mode)  # an unknown mode fails first
        diffs = []
        for i in self._editable(generated):
            before = self.entries[i].state
            after = ops.merge_generated(before.tags, generated[i], mode)
            if after != before.tags:
                diffs.append((i, before, State(after, before.folder)))
        return self._record(Change(msg("auto-tag ({mode})", mode=mode), diffs))

    def move(self, indices: Iterable[int], folder: str) -> Change | None:
        """Move images (with their captions) into another concept folder under the root, on save."""
        folder = self._check_folder(folder)
        indices = list(indices)
        taken = {self.entries[j].image() for j in range(len(self.entries))}
        diffs = []
        for i in indices:
            e = self.entries[i]
            if e.state.folder == folder:
                continue
            target = State(e.state.tags, folder)
            if e.image(target) in taken or (self.root / e.image(target)).exists():
                raise UserError(msg("cannot move {name} to {folder}: an image of that name is there", name=e.name, folder=self.root / folder))
            taken.add(e.image(target))
            diffs.append((i, e.state, target))
        label = (msg("move {count} image(s) to {folder}", count=len(diffs), folder=folder) if folder
                 else msg("move {count} image(s) to the top folder", count=len(diffs)))
        return self._record(Change(label, diffs))

    def set_repeats(self, folder: str, repeats: int) -> Change | None:
        """Rename `<N>_name` to `<repeats>_name` (kohya's repeats), on save."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise UserError(msg("repeats must be a whole number >= 1, not {value}", value=repr(repeats)))
        parent, _, name = folder.rpartition("/")
        m = _REPEATS.match(name)
        new_name = f"{repeats}_{m.group(2) if m else name}"
        target = f"{parent}/{new_name}" if parent else new_name
        if target == folder:
            return None
        if any(e.state.folder == target for e in self.entries) or (self.root / target).exists():
            raise UserError(msg("cannot rename {folder} to {name}: that folder exists", folder=self.root / folder, name=new_name))
        # unreadable captions move too: their bytes are not touched
        diffs = [(i, e.state, State(e.state.tags, target)) for i, e in enumerate(self.entries) if e.state.folder == folder]
        return self._record(Change(msg("set repeats of {folder} to {repeats}", folder=folder, repeats=repeats), diffs))

    def _check_folder(self, folder: str) -> str:
        folder = folder.replace("\\", "/").strip("/")
        parts = folder.split("/") if folder else []
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise UserError(msg("{folder}: a concept folder is a plain name under {root}, like '10_mychar'", folder=repr(folder), root=self.root))
        return folder

    # -- undo / redo ----------------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> Change | None:
        if not self._undo:
            return None
        change = self._undo.pop()
        for i, before, _ in reversed(change.diffs):
            self._set(i, before)
        self._redo.append(change)
        return change

    def redo(self) -> Change | None:
        if not self._redo:
            return None
        change = self._redo.pop()
        for i, _, after in change.diffs:
            self._set(i, after)
        self._undo.append(change)
        return change

    # -- saving ---------------------------------------------------------------------------------
    def save_plan(self, label: str = "save") -> journal.Plan:
        """The writes and moves that bring the disk to the store's state. Every caption is encoded
        first, so a tag its file's encoding cannot hold stops the save before anything is written."""
        plan = journal.Plan(label)
        by_folder: dict[str, list[int]] = {}
        for i, e in enumerate(self.entries):
            if not e.changed:
                continue
            if e.state.tags != e.saved.tags:
                text = e.head + ops.join_tags(e.state.tags) + e.rest
                try:
                    data = cap.encode_caption(text, e.encoding)
                except cap.CaptionError as err:
                    raise UserError(msg("{path}: {error}; nothing was saved", path=self.caption_path(i), error=err)) from None
                plan.writes.append(journal.Write(_rel(self.caption_path(i), self.root), data))
            if e.state.folder != e.saved.folder:
                by_folder.setdefault(e.saved.folder, []).append(i)
        for old, moved in by_folder.items():
            targets = {self.entries[i].state.folder for i in moved}
            whole = len(moved) == sum(e.saved.folder == old for e in self.entries)
            if old and whole and len(targets) == 1 and not (self.root / targets.pop()).exists():
                # the whole folder changes name (repeats): rename it, so files we don't know move too
                plan.moves.append(journal.Move(old, self.entries[moved[0]].state.folder))
                continue
            for i in moved:
                e = self.entries[i]
                plan.moves.append(journal.Move(e.image(e.saved), e.image()))
                if e.has_caption or e.state.tags != e.saved.tags:
                    plan.moves.append(journal.Move(_rel(self.caption_path(i), self.root),
                                                   _rel(self.caption_path(i, e.state), self.root)))
        return plan

    def save(self, label: str | None = None) -> Path | None:
        """Write what changed, journaled; returns the journal entry (None: nothing to save)."""
        dirty = self.dirty
        since = self._undo[self._saved_mark:] if self._saved_mark <= len(self._undo) else []
        if not label:
            # the first edit by name, not a list joined with "; ": the front ends translate a label by
            # matching it against the message templates, and a joined list would match one of them
            # with the rest of the list taken for its value ("remove {tags}")
            label = (msg("{count} image(s) edited", count=len(dirty)) if not since else since[0].label if len(since) == 1
                     else msg("{operation}, plus {count} more edit(s) in the same save", operation=since[0].label, count=len(since) - 1))
        plan = self.save_plan(label)
        entry = journal.commit(self.root, plan)
        for i in dirty:
            e = self.entries[i]
            e.has_caption = e.has_caption or e.state.tags != e.saved.tags
            e.saved = e.state
        self._saved_mark = len(self._undo)
        return entry


def _clean(tags: Sequence[str] | str) -> Tags:
    if isinstance(tags, str):
        tags = [tags]
    out = tuple(t for tag in tags for t in ops.split_tags(tag))
    if not out:
        raise UserError(msg("no tag given"))
    return out


def _repeats(folder: str) -> int | None:
    m = _REPEATS.match(folder.rpartition("/")[2])
    return int(m.group(1)) if m else None


def _walk(root: Path):
    import os

    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # our journal, caches, editors' backups
        yield Path(folder), dirs, sorted(f for f in files if not f.startswith("."))
