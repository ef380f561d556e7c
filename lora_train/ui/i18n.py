"""UI text in the user's language. The WebUI translates the page itself from `localizations/*.json`
(extension files are merged into the chosen one); the standalone server translates the same JSON
while building the tab, so both show the same words."""

from __future__ import annotations

import json
import re
import string
from functools import cached_property
from pathlib import Path
from typing import Optional

FULL_WIDTH_OPENERS = "（，。：；、"
LOCALIZATIONS = Path(__file__).resolve().parents[2] / "localizations"


def available() -> list[str]:
    return sorted(p.stem for p in LOCALIZATIONS.glob("*.json"))


class Translator:
    def __init__(self, lang: Optional[str] = None):
        self.lang = lang
        self.table: dict[str, str] = {}
        self.seen: set[str] = set()  # every string the tab asked for, for the completeness test
        if lang:
            path = LOCALIZATIONS / f"{lang}.json"
            if not path.is_file():
                from lora_train.errors import UserError, msg

                raise UserError(msg("no localization '{lang}' (known: {known})", lang=lang, known=", ".join(available()) or "none"))
            self.table = json.loads(path.read_text(encoding="utf-8"))

    def __call__(self, text: str) -> str:
        self.seen.add(text)
        return self.table.get(text, text)

    def format(self, text: str, **values) -> str:
        """A message with numbers, names or paths in it: the template is translated, then filled,
        so word order can follow the language ("{name}" stays where the translation puts it)."""
        return self(text).format(**values)

    def labelled(self, label: str, value: str) -> str:
        """`label: value` with the label in this language and the language's colon ("Started: x", "已开始：x")."""
        return self.format("{what}: {reason}", what=self(label), reason=value)

    def text(self, message) -> str:
        """A message from the core (`errors.msg`, an error, a list of problems) in this language: each
        line is looked up as it is, else matched against the templates with {placeholders}, whose
        values are translated the same way where they are messages themselves (a path is not)."""
        if isinstance(message, BaseException):
            message = message.args[0] if len(message.args) == 1 else str(message)
        message = str(message)
        if not self.table:
            return message
        lines = []
        for line in message.split("\n"):
            body = line.lstrip()  # an indented line (a report's list) keeps its indent
            lines.append(line[:len(line) - len(body)] + self._line(body, 0))
        return "\n".join(lines)

    def _line(self, line: str, depth: int) -> str:
        return self._translated(line, depth)[0]

    def _translated(self, line: str, depth: int) -> tuple[str, int]:
        """(the line in this language, how many of its characters the table's text covered).

        Every template that matches is tried, and the one covering the most wins, counting the
        text its values matched in turn: "move 6 image(s) to the top folder (on save)" is
        "{operation} (on save)" around a whole message, not "move {count} image(s) to {folder}"
        with "the top folder (on save)" as the folder."""
        body = line.strip()
        if body != line:  # a value such as " (did you mean 'x'?)" keeps the spaces around it
            if not body:
                return line, 0
            shown, covered = self._translated(body, depth)
            # ...unless its translation opens with full-width punctuation, which carries its own space
            lead = "" if shown != body and shown[:1] in FULL_WIDTH_OPENERS else line[:len(line) - len(line.lstrip())]
            return lead + shown + line[len(line.rstrip()):], covered
        if line in self.table:
            return self.table[line], len(line)
        best = (line, 0)
        if depth < 3:
            for template, literal, pattern in self._templates:
                if best[1] >= len(line):  # every character covered: nothing can beat it
                    break
                m = pattern.fullmatch(line)
                if m:
                    values = {k: self._translated(v, depth + 1) for k, v in m.groupdict().items()}
                    covered = literal + sum(c for _, c in values.values())
                    if covered > best[1]:
                        best = (self.table[template].format(**{k: v for k, (v, _) in values.items()}), covered)
        return best

    @cached_property
    def _templates(self) -> list[tuple[str, int, "re.Pattern"]]:
        """(template, length of its literal text, regex) for every entry with placeholders; the
        most literal text first, so a specific message is tried before a general one like "{what}: {why}"."""
        out = []
        for template in self.table:
            parts = list(string.Formatter().parse(template))
            if not any(name for _, name, _, _ in parts):
                continue
            regex, seen = "", set()
            for literal, name, _, _ in parts:
                regex += re.escape(literal)
                if name:
                    # a value may be empty: a hint that found no close match
                    regex += f"(?P={name})" if name in seen else f"(?P<{name}>.*?)"
                    seen.add(name)
            literal_len = sum(len(lit) for lit, _, _, _ in parts)
            out.append((literal_len, template, re.compile(regex, re.S)))
        out.sort(key=lambda x: -x[0])
        return [(template, literal, pattern) for literal, template, pattern in out]
