"""The save journal: every save of the tag store is one entry under `<root>/.lora_train/journal/`, so
any save can be undone, newest first, also from the CLI and after a restart.

An entry holds the previous bytes of every caption it overwrites and a manifest of what it did. The
manifest and the backups are on disk (fsynced) before the first caption changes; each caption is
replaced atomically. A crash mid-save therefore leaves every caption old or new, and the entry,
still marked "pending", undoes whatever part of the save happened. Undo refuses, before touching
anything, when a file was changed since by someone else: their edit would be lost.

(The dataset scanner skips hidden folders, so the journal never becomes training data.)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.dataset.captions import CaptionError, write_caption_bytes
from lora_train.errors import UserError, msg

JOURNAL_DIR = Path(".lora_train") / "journal"
KEEP = 200  # entries kept per folder; the oldest go first


@dataclass
class Write:
    path: str  # relative to the root, at the file's location before this save's moves
    data: bytes


@dataclass
class Move:
    src: str  # a file or a folder, relative to the root
    dst: str


@dataclass
class Plan:
    """What a save does: writes first (at the old locations), then moves, in order."""

    label: str
    writes: list[Write] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.writes or self.moves)


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _journal(root: Path) -> Path:
    return Path(root) / JOURNAL_DIR


def _entries(root: Path) -> list[Path]:
    folder = _journal(root)
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)) if folder.is_dir() else []


def _write_manifest(entry: Path, manifest: dict) -> None:
    write_caption_bytes(entry / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))


def load_manifest(entry: Path) -> dict:
    try:
        return json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(msg("{path}: unreadable journal entry ({error})", path=entry / "manifest.json", error=e)) from None


def history(root: Path) -> list[dict]:
    """Manifests, oldest first, with their entry folder under "entry"."""
    return [dict(load_manifest(e), entry=str(e)) for e in _entries(root)]


def commit(root: Path, plan: Plan) -> Path | None:
    """Carry out `plan`, journaled. Returns the entry folder (None when there was nothing to do)."""
    if not plan:
        return None
    root = Path(root)
    journal = _journal(root)
    journal.mkdir(parents=True, exist_ok=True)
    existing = _entries(root)
    entry = journal / f"{int(existing[-1].name) + 1 if existing else 1:06d}"
    entry.mkdir()
    actions = []
    try:
        for i, w in enumerate(plan.writes):
            before = _read(root / w.path)
            backup = None
            if before is not None:
                backup = f"{i}.bak"
                write_caption_bytes(entry / backup, before)
            actions.append({"kind": "write", "path": w.path, "backup": backup, "before": _sha(before), "after": _sha(w.data)})
        actions += [{"kind": "move", "src": m.src, "dst": m.dst} for m in plan.moves]
        manifest = {"version": 1, "label": plan.label, "time": time.time(), "state": "pending", "actions": actions}
        _write_manifest(entry, manifest)
    except CaptionError as e:
        raise UserError(msg("cannot save: the journal in {journal} is not writable ({error}); nothing was changed", journal=journal,
                            error=e)) from None
    try:
        for w in plan.writes:
            write_caption_bytes(root / w.path, w.data)
        for m in plan.moves:
            dst = root / m.dst
            if dst.exists():
                raise UserError(msg("cannot move {src} to {dst}: it exists", src=root / m.src, dst=dst))
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / m.src, dst)
    except (CaptionError, OSError) as e:
        raise UserError(msg("save stopped part-way ({error}); `undo` puts back what was changed (journal {entry})", error=e,
                            entry=entry)) from None
    manifest["state"] = "done"
    _write_manifest(entry, manifest)
    _prune(root)
    return entry


def _prune(root: Path) -> None:
    import shutil

    for old in _entries(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def last_undoable(root: Path) -> Path | None:
    return next((e for e in reversed(_entries(root)) if load_manifest(e).get("state") != "undone"), None)


def undo(root: Path) -> dict:
    """Undo the newest save not undone yet. Returns its manifest; raises UserError (and changes
    nothing) when there is none or when a file it wrote was changed since."""
    root = Path(root)
    entry = last_undoable(root)
    if entry is None:
        raise UserError(msg("nothing to undo in {folder}: no saved edit left to undo in {journal}", folder=root, journal=_journal(root)))
    manifest = load_manifest(entry)
    moves = [a for a in manifest["actions"] if a["kind"] == "move"]
    writes = [a for a in manifest["actions"] if a["kind"] == "write"]

    # Where each written file is now: a move of the file or of its folder carried it along.
    def now(rel: str) -> str:
        for m in moves:
            if (root / m["dst"]).exists() and not (root / m["src"]).exists():
                if rel == m["src"]:
                    rel = m["dst"]
                elif rel.startswith(m["src"] + "/"):
                    rel = m["dst"] + rel[len(m["src"]):]
        return rel

    conflicts, to_restore = [], []
    for a in writes:
        current = _sha(_read(root / now(a["path"])))
        if current == a["after"]:
            to_restore.append(a)
        elif current != a["before"]:  # neither ours nor the original: someone edited it since
            conflicts.append(now(a["path"]))
    to_move_back = []
    for m in moves:
        src, dst = root / m["src"], root / m["dst"]
        if dst.exists() and not src.exists():
            to_move_back.append(m)
        elif not src.exists():
            conflicts.append(m["dst"])
    if conflicts:
        listed = "".join(f"\n  {root / c}" for c in conflicts[:20])
        raise UserError(msg("cannot undo '{operation}': changed since that save, undoing would lose those edits:",
                            operation=manifest["label"]) + listed)
    for m in reversed(to_move_back):
        os.replace(root / m["dst"], root / m["src"])
    for a in to_restore:
        path = root / a["path"]
        if a["backup"] is None:
            path.unlink()
        else:
            write_caption_bytes(path, (entry / a["backup"]).read_bytes())
    manifest["state"] = "undone"
    _write_manifest(entry, manifest)
    return manifest
