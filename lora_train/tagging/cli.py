"""`python -m lora_train tags DIR ...` and `autotag DIR ...`: the tag store and its journal from a
shell, so a scripted edit is undone the same way as one made in the tab."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from lora_train.errors import msg


def add_parsers(sub, t: Callable[[str], str] = str, tr: Callable[[object], str] = str) -> None:
    """`t` (a fixed word) and `tr` (a message) put the output in the user's language: the front end
    passes its own (lora_train/cli.py), since the layer rules keep this room from importing it."""
    g = sub.add_parser("tags", help="edit the caption tags of a folder (saved with undo; see --undo)",
                       description="One operation on the captions of DIR (or of the images --where selects), saved through "
                                   "the folder's journal: `tags DIR --undo` puts the files back byte for byte.")
    g.add_argument("dir")
    op = g.add_mutually_exclusive_group(required=True)
    op.add_argument("--add-front", metavar="T", help="tags (comma-separated) to put first, e.g. a trigger word")
    op.add_argument("--add-back", metavar="T", help="tags to put last")
    op.add_argument("--remove", metavar="T", help="tags to remove")
    op.add_argument("--replace", metavar="OLD=NEW", help="replace a tag (with --regex: a pattern, re.sub on each tag)")
    op.add_argument("--dedupe", action="store_true", help="remove repeated tags")
    op.add_argument("--sort", choices=("alpha", "frequency"), help="sort tags (after the first --keep)")
    op.add_argument("--undo", action="store_true", help="undo the last saved edit of DIR")
    op.add_argument("--list", action="store_true", help="print tag frequencies, most common first")
    g.add_argument("--regex", action="store_true", help="--replace OLD is a regular expression")
    g.add_argument("--keep", type=int, default=0, help="--sort leaves this many leading tags in place")
    g.add_argument("--where", metavar="TAG", action="append", default=[], help="only images with this tag (repeatable: all of them)")
    g.add_argument("--where-not", metavar="TAG", action="append", default=[], help="only images without this tag")
    g.add_argument("--caption-extension", default=".txt")
    g.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    g.set_defaults(func=functools.partial(cmd_tags, t=t, tr=tr))

    a = sub.add_parser("autotag", help="tag a folder's images with a WD14 tagger (or caption them with BLIP), saved with undo")
    a.add_argument("dir")
    a.add_argument("--model", help="WD14 model name (see --list-models) or a folder with model.onnx + selected_tags.csv; "
                                   "with --blip a BLIP repo id or folder")
    a.add_argument("--models-dir", default=None, help="where named models are looked for and downloaded (default: ~/.cache/lora_train/models)")
    a.add_argument("--general-threshold", type=float)
    a.add_argument("--character-threshold", type=float)
    a.add_argument("--undesired", default="", help="comma-separated tags never written")
    a.add_argument("--rating", action="store_true", help="write the most likely rating tag first")
    a.add_argument("--escape-brackets", action="store_true", help="write ( ) as \\( \\) for A1111 prompts")
    a.add_argument("--mode", choices=("prefill", "overwrite", "prepend", "append"), default="prefill",
                   help="prefill: only empty captions (default); overwrite; prepend or append to what is there")
    a.add_argument("--blip", action="store_true", help="a BLIP caption instead of WD14 tags")
    a.add_argument("--where", metavar="TAG", action="append", default=[], help="only images with this tag")
    a.add_argument("--caption-extension", default=".txt")
    a.add_argument("--batch-size", type=int, default=4)
    a.add_argument("--dry-run", action="store_true")
    a.add_argument("--list-models", action="store_true", help="print the known WD14 model names and exit")
    a.set_defaults(func=functools.partial(cmd_autotag, t=t, tr=tr))


def cmd_tags(args, t: Callable[[str], str] = str, tr: Callable[[object], str] = str) -> int:
    from lora_train.errors import UserError
    from lora_train.tagging import journal
    from lora_train.tagging.store import TagStore

    if args.undo:
        manifest = journal.undo(args.dir)
        written = sum(a["kind"] == "write" for a in manifest["actions"])
        print(tr(msg("undid '{operation}': {written} caption(s) and {moved} move(s) put back", operation=manifest["label"],
                      written=written, moved=len(manifest["actions"]) - written)))
        return 0
    store = TagStore.load(args.dir, args.caption_extension)
    for problem in store.problems:
        print(f"{t('warning')}: {tr(problem)}", file=sys.stderr)
    if args.list:
        for tag, n in store.frequencies(store.select(all_of=args.where, none_of=args.where_not)).most_common():
            print(f"{n:6d}  {tag}")
        return 0
    chosen = store.select(all_of=args.where, none_of=args.where_not)
    if args.add_front or args.add_back:
        change = store.add(args.add_front or args.add_back, chosen, front=bool(args.add_front))
    elif args.remove:
        change = store.remove(args.remove, chosen)
    elif args.replace:
        if "=" not in args.replace:
            raise UserError(msg("--replace {value}: write OLD=NEW (NEW may be empty to delete)", value=repr(args.replace)))
        old, new = args.replace.split("=", 1)
        change = store.replace(old.strip(), new.strip(), chosen, regex=args.regex)
    elif args.dedupe:
        change = store.dedupe(chosen)
    else:
        change = store.sort(chosen, by=args.sort, keep=args.keep)
    return _finish(store, change, args, tr, msg("nothing changes ({count} image(s) selected)", count=len(chosen)))


def _finish(store, change, args, tr: Callable[[object], str] = str, unchanged: str | None = None) -> int:
    """Print each caption's before/after, then save (journaled) unless --dry-run."""
    if change is None:
        print(tr(unchanged or msg("nothing changes")))
        return 0
    for i, before, after in change.diffs:
        print(f"{store.caption_path(i)}\n  - {', '.join(before.tags)}\n  + {', '.join(after.tags)}")
    if args.dry_run:
        print(tr(msg("dry run: {count} caption(s) would change; nothing written", count=len(change.diffs))))
        return 0
    entry = store.save()
    print(tr(msg("{operation}: {count} caption(s) written; undo with: python -m lora_train tags {folder} --undo (journal {entry})",
                  operation=change.label, count=len(change.diffs), folder=args.dir, entry=entry)))
    return 0



def cmd_autotag(args, t: Callable[[str], str] = str, tr: Callable[[object], str] = str) -> int:
    from pathlib import Path

    from lora_train.errors import UserError
    from lora_train.tagging import autotag
    from lora_train.tagging.session import DatasetSession

    if args.list_models:
        from lora_train.tagging.wd14 import MODELS

        for name, m in MODELS.items():
            print(tr(msg("{name} {repo}  general {threshold}", name=f"{name:32s}", repo=m.repo_id, threshold=m.general_threshold)))
        return 0
    models_dir = Path(args.models_dir).expanduser() if args.models_dir else Path.home() / ".cache" / "lora_train" / "models"
    if args.blip:
        tag_images = autotag.blip_tagger(args.model, models_dir)
    else:
        if not args.model:
            raise UserError(msg("--model is required (a WD14 name from --list-models, or a folder)"))
        tag_images = autotag.wd14_tagger(args.model, models_dir, general=args.general_threshold, character=args.character_threshold,
                                         undesired=args.undesired, rating=args.rating, escape=args.escape_brackets,
                                         batch_size=args.batch_size)
        if getattr(tag_images, "warning", None):
            print(f"{t('warning')}: {tr(tag_images.warning)}", file=sys.stderr)
    session = DatasetSession()
    print(tr(session.load(args.dir, args.caption_extension)))
    session.set_filter(all_of=args.where)

    def progress(done: int, total: int) -> None:
        print("\r" + tr(msg("tagged {done}/{total}", done=done, total=total)), end="", file=sys.stderr, flush=True)

    change = session.autotag(tag_images, args.mode, batch_size=args.batch_size, progress=progress)
    print(file=sys.stderr)
    return _finish(session.store, change, args, tr)
