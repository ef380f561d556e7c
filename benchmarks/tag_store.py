"""Benchmark: the tag store on a folder of 10,000 captioned images (goals: load <= 2 s, a batch
operation on all of them <= 0.5 s).

    .venv/bin/python -m benchmarks.tag_store [--images N]

The images are 1-byte placeholders: loading reads captions and lists images, it never decodes one.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from lora_train.tagging.store import TagStore

VOCAB = [f"tag_{i}" for i in range(2000)]


def make(root: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folders = [root / f"{r}_{name}" for r, name in ((10, "char"), (5, "outfit"), (3, "style"), (1, "misc"))]
    for f in folders:
        f.mkdir(parents=True)
    for i in range(n):
        folder = folders[i % len(folders)]
        (folder / f"img{i:05d}.png").write_bytes(b"\x89")
        tags = ["1girl" if i % 3 else "1boy"] + rng.sample(VOCAB, rng.randint(10, 40))
        (folder / f"img{i:05d}.txt").write_text(", ".join(tags), encoding="utf-8")


def _timed(label: str, fn):
    t = time.perf_counter()
    out = fn()
    print(f"{label:<44} {time.perf_counter() - t:6.3f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lt-tags-"))
    try:
        make(root, args.images)
        store = _timed(f"load {args.images} captions", lambda: TagStore.load(root))
        assert len(store) == args.images
        everything = list(range(len(store)))
        _timed("add trigger at the front of all", lambda: store.add("zkz", everything))
        _timed("replace a tag in all", lambda: store.replace("1girl", "1woman", everything))
        _timed("remove 3 tags from all", lambda: store.remove(["tag_1", "tag_2", "tag_3"], everything))
        _timed("filter: 1woman AND tag_5 NOT tag_6", lambda: store.select(all_of=["1woman", "tag_5"], none_of=["tag_6"]))
        _timed("tag frequencies", store.frequencies)
        _timed("undo the last 3 operations", lambda: [store.undo() for _ in range(3)])
        _timed("redo them", lambda: [store.redo() for _ in range(3)])
        _timed(f"save ({len(store.dirty)} changed captions, journaled)", store.save)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
