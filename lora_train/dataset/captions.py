"""Caption files next to images: reading them in whatever encoding the tagger wrote, writing them back
in the same one, and turning a caption into the text one training step sees (kohya's shuffle,
keep_tokens, dropout and wildcard rules), plus prompt escaping and CLIP token counts for the editor.
"""

from __future__ import annotations

import math
import os
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from lora_train.errors import msg

DEFAULT_EXTENSIONS = (".txt", ".caption")


class CaptionError(Exception):
    """A caption file that cannot be read or written; the message says why."""


@dataclass(frozen=True)
class CaptionText:
    text: str
    # A Python codec name, except "utf-16-le-sig" / "utf-16-be-sig": UTF-16 with a BOM in that byte
    # order (Python has no such codec; "utf-16" would write the BOM in native order only).
    encoding: str


def caption_path(image: Path, extension: str | None) -> Path | None:
    """The caption file for `image`: the configured extension, else .txt then .caption."""
    for ext in (extension,) if extension else DEFAULT_EXTENSIONS:
        candidate = image.with_suffix(ext if ext.startswith(".") else "." + ext)
        if candidate.is_file():
            return candidate
    return None


# --- reading and writing ------------------------------------------------------------------------

_BOMS = (  # UTF-32 first: its LE BOM starts with UTF-16 LE's.
    (b"\xff\xfe\x00\x00", "utf-32-le", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8", "utf-8-sig"),
    (b"\xff\xfe", "utf-16-le", "utf-16-le-sig"),
    (b"\xfe\xff", "utf-16-be", "utf-16-be-sig"),
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _decode_guess(data: bytes, codec: str) -> str | None:
    # Guessed encodings (no BOM) decode many wrong inputs "successfully"; control characters are
    # what a wrong guess produces and a caption never holds.
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(text) else text


def decode_caption(data: bytes) -> CaptionText:
    """Detect the encoding of a caption file's bytes: BOM, then UTF-16 without BOM, UTF-8, GBK/GB18030."""
    if not data:
        return CaptionText("", "utf-8")
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                return CaptionText(data[len(bom) :].decode(codec), name)
            except UnicodeDecodeError as e:
                raise CaptionError(msg("starts with a {name} byte-order mark but is not valid {codec} ({reason})", name=name, codec=codec,
                                       reason=e.reason)) from None
    if b"\x00" in data:
        # UTF-16 without BOM: ASCII characters put their NUL high byte at odd offsets (LE) or even
        # ones (BE). CJK-only text has few NULs, but tag files always hold ", " and ASCII tags.
        odd, even = data[1::2].count(0), data[0::2].count(0)
        codec = "utf-16-le" if odd > even else "utf-16-be"
        text = _decode_guess(data, codec) if len(data) % 2 == 0 else None
        if text is None:
            raise CaptionError(msg("contains NUL bytes but is not UTF-16 text (a binary file?)"))
        return CaptionText(text, codec)
    try:
        return CaptionText(data.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        pass
    # Windows tools in China write the ANSI code page (GBK); GB18030 is its superset. Other legacy
    # code pages (Shift-JIS, cp1252) are not guessed: they would be misread as GBK as often as not.
    for codec in ("gbk", "gb18030"):
        text = _decode_guess(data, codec)
        if text is not None:
            return CaptionText(text, codec)
    raise CaptionError(msg("not UTF-8, UTF-16 or GBK/GB18030 text; save it as UTF-8"))


def read_caption_text(path: Path) -> CaptionText:
    """The whole file's text, undecorated (line endings kept), and the encoding it was written in."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CaptionError(msg("cannot read: {reason}", reason=e.strerror or e)) from None
    return decode_caption(data)


def _lines(text: str) -> list[str]:
    # sd-scripts reads in text mode: universal newlines, not str.splitlines' extra breaks (\x85, \u2028).
    return [line.strip() for line in re.split(r"\r\n|\r|\n", text) if line.strip()]


def read_caption(path: Path, *, wildcard: bool = False) -> str:
    """The first non-empty line, stripped. With `wildcard` (sd-scripts' enable_wildcard) all non-empty
    lines joined by "\\n", for `process_caption` to pick one from."""
    return caption_from_text(read_caption_text(path).text, wildcard=wildcard)


def caption_from_text(text: str, *, wildcard: bool = False) -> str:
    lines = _lines(text)
    return "\n".join(lines) if wildcard else (lines[0] if lines else "")


def encode_caption(text: str, encoding: str) -> bytes:
    base = {"utf-16-le-sig": "utf-16-le", "utf-16-be-sig": "utf-16-be"}.get(encoding)
    try:
        return ("\ufeff" + text).encode(base) if base else text.encode(encoding)
    except LookupError:
        raise CaptionError(msg("unknown encoding {encoding}", encoding=repr(encoding))) from None
    except UnicodeEncodeError as e:
        raise CaptionError(msg("{text} cannot be written in {encoding}", text=repr(text[e.start:e.end]), encoding=encoding)) from None


def write_caption_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Write `text` in `encoding` (a `CaptionText.encoding`, so an edited caption keeps its BOM and
    encoding). Atomic: a reader, or a crash mid-write, sees the old file or the new one, never half."""
    write_caption_bytes(path, encode_caption(text, encoding))


def write_caption_bytes(path: Path, data: bytes) -> None:
    """Atomic write of an encoded caption (see `write_caption_text`)."""
    path = Path(path)
    if path.is_symlink():  # edit the file the link points to, not replace the link with a copy
        path = path.resolve()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same folder: os.replace stays a rename
    try:
        # 0o666 lets the umask decide, as for a plainly created file; an existing file keeps its mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CaptionError(msg("cannot write {path}: {reason}", path=path, reason=e.strerror or e)) from None
        raise


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


# --- what one training step sees ----------------------------------------------------------------


@dataclass
class CaptionOptions:
    """sd-scripts' per-subset caption keys, same names and defaults."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    # "{{" / "}}" are literal braces: park them on characters the caption does not contain.
    open_, close = "⦅", "⦆"
    while open_ in caption or close in caption:
        open_, close = open_ + "⦅", close + "⦆"
    caption = caption.replace("{{", open_).replace("}}", close)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_, "{").replace(close, "}")


def warmup_tags(opts: CaptionOptions, tags: int, step: int, total_steps: int) -> int:
    """How many of a caption's `tags` movable tags step `step` (0 = the first) trains on, by sd-scripts'
    token warm-up: token_warmup_min at the first step, one more every (steps / tags added) steps,
    all of them from token_warmup_step on (below 1: that fraction of `total_steps`, rounded down)."""
    length = opts.token_warmup_step
    if length < 1:
        length = math.floor(length * total_steps)
    if not length or step >= length:
        return tags
    # grouped as sd-scripts computes it, so the float rounds the same way at each step
    return math.floor(step * ((tags - opts.token_warmup_min) / length)) + opts.token_warmup_min


def process_caption(caption: str, opts: CaptionOptions, epoch: int, rng: random.Random, step: int = 0, total_steps: int = 0) -> str:
    """The caption as sd-scripts' `BaseDataset.process_caption` makes it for one step.

    `epoch` counts from 1 as sd-scripts' does, so `caption_dropout_every_n_epochs = N` drops epochs
    N, 2N, ... `step` counts the optimizer steps done before this one (sd-scripts' global step), of
    `total_steps`, for the token warm-up. All randomness comes from `rng`, drawn in sd-scripts' order
    (dropout, line, wildcards, shuffle, tag dropout), so one seed gives one caption sequence.
    """

    def affix(line: str) -> str:
        if opts.caption_prefix:
            line = opts.caption_prefix + " " + line
        if opts.caption_suffix:
            line = line + " " + opts.caption_suffix
        return line

    # The rate draw only happens when the rate is set, as in sd-scripts, to keep the rng stream aligned.
    if opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate:
        return ""
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        return ""

    lines = [line.strip() for line in caption.split("\n") if line.strip()] or [""]
    if opts.enable_wildcard:
        # sd-scripts prefixes the joined text, so only the first line got the prefix and only the last
        # the suffix; its docs say metadata tags go on every line, so every line gets them here.
        caption = _expand_wildcards(affix(rng.choice(lines) if len(lines) > 1 else lines[0]), rng)
    else:
        caption = affix(lines[0])

    sep, kts = opts.caption_separator, opts.keep_tokens_separator
    # sd-scripts only splits on keep_tokens_separator while shuffling or dropping tags, so without them
    # "|||" was trained as text; here it is always removed.
    if opts.shuffle_caption or opts.caption_tag_dropout_rate > 0 or opts.token_warmup_step > 0 or (kts and kts in caption):

        def split(part: str) -> list[str]:
            # Empty tags ("a,, b") are dropped; sd-scripts keeps them in the keep_tokens path, where
            # they took a keep_tokens slot and came out as ", ,".
            return [t.strip() for t in part.split(sep) if t.strip()]

        suffix: list[str] = []
        if kts and kts in caption:
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, suffix_part = flex_part.split(kts, 1)
                suffix = split(suffix_part)
            fixed, flex = split(fixed_part), split(flex_part)
        else:
            tokens = split(caption)
            fixed, flex = tokens[: opts.keep_tokens], tokens[opts.keep_tokens :]
        # kept tags always stay; the warm-up takes the first movable tags in caption order, then shuffles
        flex = flex[: max(0, warmup_tags(opts, len(flex), step, total_steps))]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        # Joined with "<separator> " as sd-scripts does since its fix for custom separators (#1304);
        # for the default "," that is its long-standing ", ".
        caption = (sep if sep.endswith(" ") else sep + " ").join(fixed + flex + suffix)

    # Tags joined by the secondary separator moved and dropped as one; now they become separate tags.
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, sep)
    return caption


# --- prompts ------------------------------------------------------------------------------------

_SPECIAL = re.compile(r"[\\()\[\]]")
_ESCAPED = re.compile(r"\\([\\()\[\]])")


def escape_prompt(text: str) -> str:
    """Text the A1111 prompt parser reads literally: `hood (clothing)` -> `hood \\(clothing\\)`.

    Backslashes are doubled too, because the parser drops a lone backslash. It always escapes, even
    text that looks escaped already: skipping `\\(` would make `escape_prompt` idempotent but lose
    the round trip (`unescape_prompt(escape_prompt(x)) == x`), and a tag may really hold a backslash.
    Escape raw tags once; do not escape a prompt a user wrote.
    """
    return _SPECIAL.sub(r"\\\g<0>", text)


def unescape_prompt(text: str) -> str:
    """Inverse of `escape_prompt`. A backslash before any other character is left as it is."""
    return _ESCAPED.sub(r"\1", text)


# --- token budget -------------------------------------------------------------------------------

TOKEN_BUDGETS = (75, 150, 225)  # sd-scripts' max_token_length choices, in tokens without BOS/EOS


def count_tokens(text: str, tokenizer) -> int:
    """CLIP tokens in `text` without BOS/EOS, from a Hugging Face tokenizer (or one with `tokenize`)."""
    if callable(tokenizer):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer.tokenize(text))


def token_budget(n: int) -> int | None:
    """The smallest max_token_length that holds `n` tokens; None when even 225 is too short."""
    return next((b for b in TOKEN_BUDGETS if n <= b), None)
