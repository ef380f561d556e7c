"""TOML files: read with a clear error naming the file, written atomically.

A config copied from a web page or a chat often carries characters TOML does not take: non-breaking
and full-width spaces, a full-width `＝`, smart or full-width quotes, byte-order marks pasted between
lines. They are invisible or look right, so the user cannot see why "line 1" is invalid; such a file
is read after replacing them outside the quoted strings, with one warning that says what was replaced.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from lora_train.errors import UserError, msg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 hosts
    import tomli as tomllib


class PastedTextWarning(UserWarning):
    """A TOML file was read after normalising pasted characters (the CLI prints it as a warning line)."""


def read_toml(path: str | os.PathLike, what: str = "file", warn: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The file's tables. `warn` receives the one line saying what pasted characters were replaced
    (default: a PastedTextWarning)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(msg("{what} '{path}' does not exist", what=what, path=path))
    try:
        text = path.read_text(encoding="utf-8-sig")
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            # a valid file is read exactly as written: only one TOML refuses is normalised
            fixed, changes = normalise_pasted(text)
            if not changes:
                raise
            data = tomllib.loads(fixed)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(msg("{path}: not valid TOML ({error})", path=path, error=e)) from e
    note = msg("{path}: read after normalising text pasted from a web page: {changes}", path=path, changes=changes)
    if warn is None:
        warnings.warn(note, PastedTextWarning, stacklevel=2)
    else:
        warn(note)
    return data


# Outside quoted strings: (character, what it becomes). Full-width punctuation is what a Chinese or
# Japanese input method types; the rest is what web pages and word processors put in copied text.
_SPACES = {"\u00a0": " ", "\u3000": " ", "\u2007": " ", "\u202f": " ", "\ufeff": "", "\u200b": ""}
_PUNCTUATION = {"＝": "=", "，": ",", "［": "[", "］": "]"}
_DOUBLE_QUOTES = "\u201c\u201d\u201e\uff02"  # “ ” „ ＂
_SINGLE_QUOTES = "\u2018\u2019\uff07"  # ‘ ’ ＇


def normalise_pasted(text: str) -> tuple[str, str]:
    """`text` with pasted characters replaced outside TOML strings, and a summary of what was
    replaced (`U+00A0→' ' ×3, '＝'→'=' ×1`; empty when nothing was). Strings written with ASCII
    quotes keep every character; a string in smart quotes gets ASCII ones. Comments and
    multi-line strings are left as they are. Line breaks are kept, so TOML's line numbers still fit."""
    out: list[str] = []
    counts: dict[tuple[str, str], int] = {}

    def put(original: str, replacement: str) -> None:
        out.append(replacement)
        if replacement != original:
            counts[(original, replacement)] = counts.get((original, replacement), 0) + 1

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith(('"""', "'''"), i):  # a multi-line string: copied whole
            end = text.find(text[i:i + 3], i + 3)
            end = n if end < 0 else end + 3
            out.append(text[i:end])
            i = end
        elif c == "#":  # a comment, to the end of the line
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(text[i:end])
            i = end
        elif c in "\"'" or c in _DOUBLE_QUOTES or c in _SINGLE_QUOTES:
            i = _string(text, i, put, out)
        elif c in _SPACES:
            put(c, _SPACES[c])
            i += 1
        elif c in _PUNCTUATION:
            put(c, _PUNCTUATION[c])
            i += 1
        else:
            out.append(c)
            i += 1
    changes = ", ".join(f"{_shown(a)}→{_shown(b)} ×{count}" for (a, b), count in counts.items())
    return "".join(out), changes


def _string(text: str, i: int, put, out: list[str]) -> int:
    """Copy the one-line string starting at `i`; return the index after it."""
    opener = text[i]
    double = opener == '"' or opener in _DOUBLE_QUOTES
    line_end = text.find("\n", i)
    line_end = len(text) if line_end < 0 else line_end
    smart = _DOUBLE_QUOTES if double else _SINGLE_QUOTES
    ascii_quote = '"' if double else "'"
    if opener == ascii_quote:
        # an ASCII string keeps its content; its end is the next unescaped ASCII quote, or, when a
        # pasted line closes it with a smart quote instead, the last smart quote of the line
        close = _find_close(text, i + 1, line_end, ascii_quote, escapes=double)
        if close is None:
            close = max(text.rfind(q, i + 1, line_end) for q in smart)
            if close < 0:  # unterminated: TOML says so
                out.append(text[i:line_end])
                return line_end
    else:
        close = _find_close(text, i + 1, line_end, ascii_quote + smart, escapes=False)
        if close is None:
            out.append(text[i:line_end])
            return line_end
    body = text[i + 1:close]
    quote = ascii_quote
    if opener != ascii_quote and double and "\\" in body and "'" not in body:
        # a Windows path in smart quotes ("C:\models\x.safetensors"): its backslashes are meant as
        # written, which TOML's literal string keeps
        quote = "'"
    put(opener, quote)
    out.append(body)
    put(text[close], quote)
    return close + 1


def _find_close(text: str, start: int, end: int, quotes: str, escapes: bool) -> Optional[int]:
    j = start
    while j < end:
        if escapes and text[j] == "\\":
            j += 2
            continue
        if text[j] in quotes:
            return j
        j += 1
    return None


def _shown(c: str) -> str:
    """A character as the warning names it: invisible ones by code point."""
    return f"U+{ord(c):04X}" if c in _SPACES else repr(c)


def parse_toml_text(text: str, what: str) -> dict[str, Any]:
    """TOML held in a string (a field of another config); `what` names it in the error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(msg("{what}: not valid TOML ({error})", what=what, error=e)) from e


def parse_toml_value(text: str) -> Any:
    """A TOML value (`1e-4`, `true`, `"x"`), or the text itself when it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def write_toml(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(tmp, path)
    return path
