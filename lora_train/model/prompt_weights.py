"""Attention weights written in a caption, `(word:1.3)` / `(word)` / `[word]`: the prompt syntax the
WebUI reads and sd-scripts' weighted_captions trains with.

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies
  it by w; nested brackets multiply. A bracket left open applies to the end of the caption.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; a lone backslash is dropped.
- A closing bracket with nothing open is plain text.
"""

from __future__ import annotations

import re

UP = 1.1  # (text)
DOWN = 1 / 1.1  # [text]

_PIECE = re.compile(
    r"\\[()\[\]\\]"  # an escaped bracket or backslash
    r"|\\"  # a lone backslash
    r"|\(|\["  # opening brackets
    r"|:([+-]?[.\d]+)\)"  # the end of (text:weight)
    r"|\)|\]"  # closing brackets
    r"|[^\\()\[\]:]+"  # text
    r"|:"
)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """`text` as runs of (text, weight); neighbouring runs of equal weight are merged."""
    runs: list[list] = []
    round_open: list[int] = []  # where each open bracket's run starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _PIECE.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open and _is_number(weight):
            scale(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            scale(round_open.pop(), UP)
        elif piece == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            runs.append([piece, 1.0])
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)
    merged: list[list] = []
    for piece, weight in runs or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False  # "(a:.)": read as text rather than stop the run
    return True
