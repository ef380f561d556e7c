"""One user's Dataset tab, without gradio: the loaded store, the filter, the page of thumbnails, batch
operations with their preview, and auto-tagging. The tab only turns these into components.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from lora_train.access import AccessPolicy
from lora_train.errors import UserError, msg
from lora_train.tagging import journal, ops
from lora_train.tagging.store import Change, TagStore

THUMB = 192
PAGE = 48
THUMBS_KEPT = 480  # ten pages: about 50 MB of 192 px thumbnails, however many images the folder has
SAFE_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")  # what may be written where strangers type paths
BATCH_OPS = ("add front", "add back", "remove", "replace", "replace regex", "dedupe", "sort alpha", "sort frequency",
             "truncate to tokens")


@dataclass
class Filter:
    all_of: list[str] = field(default_factory=list)
    any_of: list[str] = field(default_factory=list)
    none_of: list[str] = field(default_factory=list)
    search: str = ""


def _tag_list(text: str | list[str] | None) -> list[str]:
    if not text:
        return []
    return list(text) if isinstance(text, list) else list(ops.split_tags(text))


def batch_fn(op: str, a: str, b: str = "", keep: int = 0, frequency=None) -> tuple[str, Callable]:
    """(label, tags -> tags) for one of BATCH_OPS; `a`/`b` are the tag / old-new texts."""
    if op in ("add front", "add back", "remove"):
        tags = ops.split_tags(a or "")
        if not tags:
            raise UserError(msg("type the tag(s) first"))
        if op == "remove":
            return msg("remove {tags}", tags=repr(a)), lambda t: ops.remove(t, tags)
        front = op == "add front"
        label = msg("add {tags} at the front", tags=repr(a)) if front else msg("add {tags} at the end", tags=repr(a))
        return label, (lambda t: ops.add_front(t, tags)) if front else (lambda t: ops.add_back(t, tags))
    if op in ("replace", "replace regex"):
        if not (a or "").strip():
            raise UserError(msg("type the tag (or pattern) to replace"))
        regex = op == "replace regex"
        if regex:
            ops.compile_pattern(a)
        return msg("replace {old} with {new}", old=repr(a), new=repr(b)), lambda t: ops.replace(t, a.strip(), (b or "").strip(), regex=regex)
    if op == "dedupe":
        return msg("remove duplicate tags"), ops.dedupe
    if op == "truncate to tokens":
        try:
            budget = int(str(a).strip() or 75)
        except ValueError:
            raise UserError(msg("'{value}': the token budget is a whole number, e.g. 75 (sd-scripts' max_token_length 75/150/225)", value=a)) from None
        from lora_train.dataset.captions import count_tokens
        from lora_train.model.clip_files import clip_l_tokenizer

        tokenizer = clip_l_tokenizer()
        return msg("truncate to {budget} tokens", budget=budget), lambda t: ops.truncate(t, budget, lambda text: count_tokens(text, tokenizer))
    if op in ("sort alpha", "sort frequency"):
        by = op.split()[1]
        label = msg("sort tags by frequency") if by == "frequency" else msg("sort tags alphabetically")
        return label, lambda t: ops.sort(t, by=by, keep=keep, frequency=frequency)
    raise UserError(msg("unknown operation {op}", op=repr(op)))


class DatasetSession:
    def __init__(self, access: AccessPolicy | None = None, models_dir: Path | None = None):
        self.access = access or AccessPolicy()
        self.models_dir = Path(models_dir) if models_dir else None
        self.store: TagStore | None = None
        self.filter = Filter()
        self.page = 0
        self.selected: int | None = None
        self._thumbs: OrderedDict[tuple[str, int], Image.Image] = OrderedDict()

    # -- loading and viewing ----------------------------------------------------------------------
    def load(self, folder: str, caption_extension: str = ".txt") -> str:
        path = self.access.folder(folder)
        caption_extension = caption_extension or ".txt"
        if self.access.roots_only and caption_extension.lower() not in SAFE_CAPTION_EXTENSIONS:
            # captions are saved as <image name><extension>: a visitor may not choose '.sh' or '.py'
            raise UserError(msg("caption extension '{ext}': only {allowed} here; {why}", ext=caption_extension,
                                allowed=", ".join(SAFE_CAPTION_EXTENSIONS), why=self.access.why()))
        self.store = TagStore.load(path, caption_extension)
        self.filter, self.page, self.selected = Filter(), 0, (0 if len(self.store) else None)
        self._thumbs.clear()
        text = msg("{count} images in {folder}", count=len(self.store), folder=path)
        return text + "".join(f"\n{p}" for p in self.store.problems[:20])

    def require(self) -> TagStore:
        if self.store is None:
            raise UserError(msg("load a folder first"))
        return self.store

    def set_filter(self, all_of=None, any_of=None, none_of=None, search: str = "") -> list[int]:
        self.filter = Filter(_tag_list(all_of), _tag_list(any_of), _tag_list(none_of), (search or "").strip())
        self.page = 0
        visible = self.visible()
        if self.selected not in visible:  # the editor shows an image the gallery shows
            self.selected = visible[0] if visible else None
        return visible

    def visible(self) -> list[int]:
        if self.store is None:
            return []
        f = self.filter
        return self.store.select(all_of=f.all_of, any_of=f.any_of, none_of=f.none_of, search=f.search)

    def pages(self) -> int:
        return max(1, -(-len(self.visible()) // PAGE))

    def page_indices(self) -> list[int]:
        self.page = min(max(self.page, 0), self.pages() - 1)
        return self.visible()[self.page * PAGE:(self.page + 1) * PAGE]

    def thumbnail(self, i: int) -> Image.Image:
        """A small copy held in memory (the gallery never gets the full image)."""
        store = self.require()
        path = store.image_path(i)
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return Image.new("RGB", (THUMB, THUMB), "gray")
        thumb = self._thumbs.get(key)
        if thumb is not None:
            self._thumbs.move_to_end(key)
        else:
            try:
                with Image.open(path) as im:
                    im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at a fraction of the size
                    thumb = ImageOps.exif_transpose(im).convert("RGB")
                    thumb.thumbnail((THUMB, THUMB))
            except (OSError, ValueError, Image.DecompressionBombError):
                thumb = Image.new("RGB", (THUMB, THUMB), "gray")
            self._thumbs[key] = thumb
            while len(self._thumbs) > THUMBS_KEPT:
                self._thumbs.popitem(last=False)  # the least recently shown
        return thumb

    def gallery(self) -> list[tuple[Image.Image, str]]:
        store = self.require() if self.store else None
        if store is None:
            return []
        return [(self.thumbnail(i), store.entries[i].image()) for i in self.page_indices()]

    def select_on_page(self, k: int) -> int | None:
        page = self.page_indices()
        self.selected = page[k] if 0 <= k < len(page) else None
        return self.selected

    def tag_counts(self, scope: str = "filtered") -> list[tuple[str, int]]:
        if self.store is None:
            return []
        freq = self.store.frequencies(self.visible() if scope == "filtered" else None)
        return sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))

    # -- editing ----------------------------------------------------------------------------------
    def batch(self, op: str, a: str = "", b: str = "", keep: int = 0, *, dry_run: bool = False) -> tuple[str, list]:
        """Run (or with dry_run, preview) a batch operation on the filtered images."""
        store = self.require()
        label, fn = batch_fn(op, a, b, keep, store.frequencies() if op == "sort frequency" else None)
        if dry_run:
            diffs = store.preview(fn, self.visible())
            return msg("{operation}: {changed} of {filtered} filtered caption(s) would change", operation=label, changed=len(diffs), filtered=len(self.visible())), diffs
        change = store.apply(label, fn, self.visible())
        n = len(change.diffs) if change else 0
        # (index, tags before, tags after), as the preview gives them
        return msg("{operation}: {changed} caption(s) changed (not saved yet)", operation=label, changed=n), [(i, b.tags, a.tags) for i, b, a in (change.diffs if change else [])]

    def set_caption(self, text: str) -> str:
        store = self.require()
        if self.selected is None:
            raise UserError(msg("pick an image first"))
        change = store.set_caption(self.selected, text or "")
        return msg("caption changed (not saved yet)") if change else msg("no change")

    def undo(self) -> str:
        change = self.require().undo()
        return msg("undone: {operation}", operation=change.label) if change else msg("nothing to undo")

    def redo(self) -> str:
        change = self.require().redo()
        return msg("redone: {operation}", operation=change.label) if change else msg("nothing to redo")

    def move(self, folder: str) -> str:
        self.access.check_changes_files(msg("moving images"))
        change = self.require().move(self.visible(), folder)
        return msg("{operation} (on save)", operation=change.label) if change else msg("no change")

    def set_repeats(self, folder: str, repeats: int) -> str:
        self.access.check_changes_files(msg("renaming folders"))
        change = self.require().set_repeats(folder, int(repeats))
        return msg("{operation} (on save)", operation=change.label) if change else msg("no change")

    def save(self) -> str:
        store = self.require()
        n = len(store.dirty)
        entry = store.save()
        return msg("saved {count} image(s); Undo last save puts them back", count=n) if entry else msg("nothing to save")

    def undo_save(self) -> str:
        store = self.require()
        if store.dirty:
            raise UserError(msg("save or undo the unsaved edits first: undoing a save reloads the folder"))
        manifest = journal.undo(store.root)
        self.load(str(store.root), store.caption_extension)
        return msg("undid the save '{operation}'", operation=manifest["label"])

    def check(self, resolution: str = "512", trigger: str = "", tokens: bool = True) -> str:
        """The dataset QA of `dataset check` (problems, buckets, duplicates, token lengths) for the
        saved folder, plus how many captions hold the trigger word."""
        from lora_train.dataset.check import CheckOptions, check_dataset, format_report

        store = self.require()
        root = store.root if any(store.folders()) else store.root.parent
        try:
            side = min(int(v) for v in str(resolution).replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise UserError(msg("resolution '{value}': a number like 512 or 512,768", value=resolution)) from None
        # bucket bounds around small sizes too (the 256 default is for 512 px and up)
        options = CheckOptions(resolution=str(resolution), caption_extension=store.caption_extension, tokens=tokens,
                               min_bucket_reso=min(256, side), max_bucket_reso=max(1024, side))
        _, report = check_dataset(root, options)
        text = format_report(report)
        trigger = (trigger or "").strip()
        if trigger:
            first = sum(store.tags(i)[:1] == (trigger,) for i in range(len(store)))
            anywhere = len(store.images_with(trigger))
            text += "\n" + msg("trigger '{trigger}': first tag in {first} of {total} captions, present in {anywhere}",
                               trigger=trigger, first=first, total=len(store), anywhere=anywhere)
        if store.dirty:
            text += "\n" + msg("(checked the saved files: {count} image(s) have unsaved edits)", count=len(store.dirty))
        return text

    def prepare(self, destination: str, size: str, crop: str = "center", progress=None) -> str:
        """Crop and resize the loaded folder into a new folder (the originals are never written),
        then load that folder."""
        from lora_train.dataset.prepare import prepare

        store = self.require()
        if store.dirty:
            raise UserError(msg("save the caption edits first: the copy takes the captions from the files"))
        dst = self.access.folder(destination, must_exist=False)
        report = prepare(store.root, dst, size, crop=crop, progress=progress)
        summary = report.summary()
        self.load(str(dst), store.caption_extension)
        return summary + "\n" + msg("loaded {folder}", folder=dst)

    def autotag(self, tag_images: Callable[[list[Image.Image]], list[list[str]]], mode: str, *,
                batch_size: int = 8, progress=None, cancel=None) -> Change | None:
        """Tag the filtered images with `tag_images` (a tagger or captioner turned into lists of
        tags) and merge by `mode`. Images are opened a batch at a time; a cancel keeps nothing."""
        store = self.require()
        ops.merge_generated((), (), mode)  # a bad mode fails before the slow part
        indices = [i for i in self.visible() if store.entries[i].error is None]
        generated: dict[int, list[str]] = {}
        for start in range(0, len(indices), batch_size):
            if cancel is not None and cancel():
                raise UserError(msg("auto-tagging cancelled after {done} of {total} images; nothing was changed", done=start, total=len(indices)))
            chunk = indices[start:start + batch_size]
            images = [_open(store.image_path(i)) for i in chunk]
            for i, tags in zip(chunk, tag_images(images)):
                generated[i] = list(tags)
            if progress is not None:
                progress(min(start + batch_size, len(indices)), len(indices))
        return store.merge_generated(generated, mode)


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(msg("{path}: cannot read this image ({error})", path=path, error=e)) from None
