"""Scanning a kohya-style dataset folder: `train_data_dir/<repeats>_<name>/` with images and captions.

A scan never stops at one bad file: it returns the usable items and a list of problems
(file, reason) for the user to see.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.dataset import captions as cap
from lora_train.dataset.images import IMAGE_EXTENSIONS
from lora_train.errors import UserError

REPEATS_DIR = re.compile(r"^(\d+)_(.*)$")


@dataclass
class Item:
    path: Path
    caption: str
    repeats: int
    subset: str  # folder name, e.g. "10_zkz"


@dataclass
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Subset:
    folder: Path
    repeats: int
    class_tokens: str
    items: list[Item] = field(default_factory=list)


@dataclass
class Scan:
    root: Path
    subsets: list[Subset]
    problems: list[Problem]

    @property
    def items(self) -> list[Item]:
        return [i for s in self.subsets for i in s.items]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per folder, how many captions hold each tag."""
        return {s.folder.name: dict(Counter(t for i in s.items for t in set(cap.tags(i.caption)))) for s in self.subsets}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        return {s.folder.name: {"n_repeats": s.repeats, "img_count": len(s.items)} for s in self.subsets}


def scan_kohya_folder(root: str | Path, caption_extension: str | None = None) -> Scan:
    root = Path(root)
    if not root.exists():
        raise UserError(f"train_data_dir '{root}' does not exist")
    if not root.is_dir():
        raise UserError(f"train_data_dir '{root}' is not a folder")
    problems: list[Problem] = []
    subsets: list[Subset] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        m = REPEATS_DIR.match(folder.name)
        if not m:
            problems.append(Problem(folder, "folder name has no repeats prefix like '10_name'; its images are not used"))
            continue
        subset = Subset(folder, int(m.group(1)), m.group(2).strip())
        if subset.repeats < 1:
            problems.append(Problem(folder, "repeats must be at least 1; its images are not used"))
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_file = cap.caption_path(path, caption_extension)
            caption = subset.class_tokens
            if caption_file is not None:
                try:
                    caption = cap.read_caption(caption_file) or subset.class_tokens
                except UnicodeDecodeError:
                    problems.append(Problem(caption_file, "caption is not UTF-8/UTF-16 text; the folder name is used instead"))
            subset.items.append(Item(path, caption, subset.repeats, folder.name))
        if not subset.items:
            problems.append(Problem(folder, "no images (png/jpg/jpeg/webp/bmp) in this folder"))
        subsets.append(subset)
    if not any(s.items for s in subsets):
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = (
            f" The images are directly in '{root}': put them in a subfolder named '<repeats>_<name>', e.g. '{root / '10_mychar'}'."
            if loose
            else " Expected subfolders named '<repeats>_<name>', e.g. '10_mychar', holding the images."
        )
        details = "".join(f"\n  {p}" for p in problems)
        raise UserError(f"no training images found in '{root}'.{hint}{details}")
    return Scan(root, [s for s in subsets if s.items], problems)
