"""Scanning the dataset: which images train, with which captions and repeats, and what is wrong.

A scan reads image headers, not pixels, and never stops at one bad file: it returns the usable
items and a list of problems (file, reason) for the user to see.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_train.dataset import captions as cap
from lora_train.dataset.images import IMAGE_EXTENSIONS, ImageError, probe
from lora_train.dataset.metadata import read_metadata
from lora_train.dataset.spec import DatasetSpec, SubsetSpec
from lora_train.errors import UserError, msg
from lora_train.tomlfile import read_toml

# Per-image repeats (online trainers let users set them): a `repeats.toml` in the image folder,
# `"image.png" = 20`, overrides the folder's count for those images.
REPEATS_FILE = "repeats.toml"


@dataclass
class Item:
    path: Path
    size: tuple[int, int]  # after EXIF orientation
    caption: str
    repeats: int
    subset: SubsetSpec
    caption_file: Path | None = None
    caption_encoding: str | None = None
    has_alpha: bool = False
    frames: int = 1
    bucket_size: tuple[int, int] | None = None  # a metadata file's size to pick the bucket by, in place of `size`

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg

    @property
    def folder(self) -> str:
        return subset_name(self.subset)


def subset_name(subset: SubsetSpec) -> str:
    """How sd-scripts names a subset in ss_dataset_dirs and ss_tag_frequency: its folder, or its metadata file."""
    return Path(subset.metadata_file or subset.image_dir).name


@dataclass
class Problem:
    path: Path
    reason: str

    def __str__(self) -> str:
        return msg("{path}: {reason}", path=self.path, reason=self.reason)


@dataclass
class Scan:
    subsets: list[SubsetSpec]
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # usable but worth knowing (encodings, animations)

    @property
    def train_items(self) -> list[Item]:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list[Item]:
        return [i for i in self.items if i.is_reg]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per folder, how many captions hold each tag."""
        freq: dict[str, Counter] = {}
        for i in self.train_items:
            freq.setdefault(i.folder, Counter()).update(set(cap.tags(i.caption)))
        return {k: dict(v) for k, v in freq.items()}

    def dataset_dirs(self, reg: bool = False) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.subsets:
            if s.is_reg == reg:
                count = sum(1 for i in self.items if i.subset is s)
                out[subset_name(s)] = {"n_repeats": s.num_repeats, "img_count": count}
        return out


def _image_files(folder: Path) -> list[Path]:
    """Images in `folder` and its subfolders (nested folders train with their parent's repeats)."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden folders: our caches, editors' backups
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


def _per_image_repeats(folder: Path, problems: list[Problem]) -> dict[str, int]:
    path = folder / REPEATS_FILE
    if not path.is_file():
        return {}
    try:
        data = read_toml(path)
    except UserError as e:
        problems.append(Problem(path, msg("{error}; folder repeats used", error=e)))
        return {}
    out = {}
    for name, value in data.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(Problem(path, msg("'{name}': repeats must be a whole number >= 0", name=name)))
        elif not (folder / name).is_file():
            problems.append(Problem(path, msg("'{name}': no such image in {folder}", name=name, folder=folder)))
        else:
            out[name.replace("\\", "/")] = value
    return out


def scan_metadata_subset(subset: SubsetSpec, problems: list[Problem], notes: list[Problem]) -> list[Item]:
    """A fine-tuning subset: the images and captions its metadata file lists (caption files are not read)."""
    file = Path(subset.metadata_file)
    if subset.num_repeats < 1:
        problems.append(Problem(file, msg("repeats must be at least 1; its images are not used")))
        return []
    image_dir = Path(subset.image_dir) if subset.image_dir else None
    entries, found, remarks = read_metadata(file, image_dir, subset.caption_separator, subset.enable_wildcard)
    problems += [Problem(p, r) for p, r in found]
    notes += [Problem(p, r) for p, r in remarks]
    items = []
    for e in entries:
        try:
            info = probe(e.path)
        except ImageError as err:
            problems.append(Problem(e.path, str(err)))
            continue
        if e.size and abs(e.size[0] * info.size[1] - e.size[1] * info.size[0]) > 0.05 * e.size[1] * info.size[0]:
            notes.append(Problem(file, msg("'{key}': the metadata's size {given} has another shape than the image ({size}): "
                                           "the image is stretched to it, as in sd-scripts", key=e.key, given=f"{e.size[0]}x{e.size[1]}",
                                           size=f"{info.size[0]}x{info.size[1]}")))
        items.append(Item(e.path, info.size, e.caption, subset.num_repeats, subset, None, None, info.has_alpha, info.frames, e.size))
    return items


def scan_subset(subset: SubsetSpec, problems: list[Problem], notes: list[Problem]) -> list[Item]:
    if subset.metadata_file:
        return scan_metadata_subset(subset, problems, notes)
    folder = Path(subset.image_dir)
    if not folder.is_dir():
        problems.append(Problem(folder, msg("image folder does not exist")))
        return []
    overrides = _per_image_repeats(folder, problems)
    items = []
    for path in _image_files(folder):
        try:
            info = probe(path)
        except ImageError as e:
            problems.append(Problem(path, str(e)))
            continue
        if info.frames > 1:
            notes.append(Problem(path, msg("animated ({frames} frames): the first frame is used", frames=info.frames)))
        caption, caption_file, encoding = subset.class_tokens or "", cap.caption_path(path, subset.caption_extension), None
        if caption_file is not None:
            try:
                text = cap.read_caption_text(caption_file)
                encoding = text.encoding
                caption = cap.caption_from_text(text.text, wildcard=subset.enable_wildcard) or caption
                if encoding not in ("utf-8", "ascii"):
                    notes.append(Problem(caption_file, msg("caption encoding {encoding}", encoding=encoding)))
            except cap.CaptionError as e:
                problems.append(Problem(caption_file, msg("{error}; the folder's class token is used instead", error=e)))
        repeats = overrides.get(path.relative_to(folder).as_posix(), subset.num_repeats)
        if repeats == 0:
            continue
        items.append(Item(path, info.size, caption, repeats, subset, caption_file, encoding, info.has_alpha, info.frames))
    if not items and not any(p.path == folder for p in problems):
        problems.append(Problem(folder, msg("no images (png/jpg/jpeg/webp/bmp/gif) in this folder")))
    return items


def scan(spec: DatasetSpec, folder_problems: list[tuple[Path, str]] = ()) -> Scan:
    problems = [Problem(Path(p), r) for p, r in folder_problems]
    notes: list[Problem] = []
    items = [item for subset in spec.subsets for item in scan_subset(subset, problems, notes)]
    if not any(not i.is_reg for i in items):
        roots = sorted({str(Path(s.metadata_file or s.image_dir).parent) for s in spec.subsets if not s.is_reg}
                       | {str(p.path.parent) for p in problems})
        details = "".join(f"\n  {p}" for p in problems)
        where = ", ".join(repr(r) for r in roots) or msg("the dataset")
        raise UserError(msg("no training images found in {where}.", where=where) + details)
    return Scan(spec.subsets, items, problems, notes)


def require_training_folder(root: Path) -> str:
    """Hint for a train_data_dir that holds images directly instead of `<repeats>_<name>` folders."""
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS] if root.is_dir() else []
    if loose:
        return " " + msg("The images are directly in '{path}': put them in a subfolder named '<repeats>_<name>', e.g. '{example}'.",
                         path=root, example=root / "10_mychar")
    return " " + msg("Expected subfolders named '<repeats>_<name>', e.g. '10_mychar', holding the images.")
