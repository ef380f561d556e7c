"""Edits of one caption's tag list. Pure functions: each takes a tag list and returns a new one, so
the store can record before/after for undo and preview a batch operation without applying it.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

from lora_train.errors import UserError, msg

Tags = tuple[str, ...]


def split_tags(text: str) -> Tags:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def dedupe(tags: Sequence[str]) -> Tags:
    """First occurrence wins, so a trigger word at the front stays at the front."""
    return tuple(dict.fromkeys(tags))


def add_front(tags: Sequence[str], new: Sequence[str]) -> Tags:
    """`new` first, in its order; an occurrence further back moves to the front instead of doubling."""
    new = dedupe(new)
    return new + tuple(t for t in tags if t not in new)


def add_back(tags: Sequence[str], new: Sequence[str]) -> Tags:
    return tuple(tags) + tuple(t for t in dedupe(new) if t not in tags)


def remove(tags: Sequence[str], unwanted: Iterable[str]) -> Tags:
    unwanted = set(unwanted)
    return tuple(t for t in tags if t not in unwanted)


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(msg("bad regular expression {pattern}: {error}", pattern=repr(pattern), error=e)) from None


def replace(tags: Sequence[str], old: str, new: str, *, regex: bool = False) -> Tags:
    """Plain: a tag equal to `old` becomes `new`. Regex: `re.sub` on every tag (a full-tag match is
    `^...$`). Either way the result may be several tags ("a, b") or none (""), and is deduplicated."""
    out: list[str] = []
    if regex:
        pattern = compile_pattern(old)
        for t in tags:
            try:
                out += split_tags(pattern.sub(new, t))
            except re.error as e:  # a bad group reference in `new`
                raise UserError(msg("bad replacement {new} for {old}: {error}", new=repr(new), old=repr(old), error=e)) from None
    else:
        for t in tags:
            out += split_tags(new) if t == old else (t,)
    return dedupe(out)


def sort(tags: Sequence[str], *, by: str = "alpha", keep: int = 0, frequency: dict[str, int] | None = None) -> Tags:
    """Sort all but the first `keep` tags (kohya's keep_tokens: the trigger stays in front).
    by="frequency": most common in the dataset first, ties alphabetical."""
    head, tail = tuple(tags[:keep]), list(tags[keep:])
    if by == "alpha":
        tail.sort(key=str.casefold)
    elif by == "frequency":
        freq = frequency or {}
        tail.sort(key=lambda t: (-freq.get(t, 0), t.casefold()))
    else:
        raise UserError(msg("unknown sort order {order}: use 'alpha' or 'frequency'", order=repr(by)))
    return head + tuple(tail)


def truncate(tags: Sequence[str], max_tokens: int, count: Callable[[str], int]) -> Tags:
    """Drop tags from the end until the caption fits `max_tokens` (CLIP tokens without BOS/EOS), the
    way sd-scripts would cut it anyway, but at a tag boundary."""
    tags = tuple(tags)
    while tags and count(join_tags(tags)) > max_tokens:
        tags = tags[:-1]
    return tags


def merge_generated(tags: Sequence[str], generated: Sequence[str], mode: str) -> Tags:
    """Auto-tagger modes, as dataset-tag-editor names them."""
    if mode == "prefill":
        return tuple(tags) if tags else dedupe(generated)
    if mode == "overwrite":
        return dedupe(generated)
    if mode == "prepend":
        return dedupe(tuple(generated) + tuple(tags))
    if mode == "append":
        return dedupe(tuple(tags) + tuple(generated))
    raise UserError(msg("unknown mode {mode}: use prefill, overwrite, prepend or append", mode=repr(mode)))
