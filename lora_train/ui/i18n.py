"""UI text in the user's language. The WebUI translates the page itself from `localizations/*.json`
(extension files are merged into the chosen one); the standalone server translates the same JSON
while building the tab, so both show the same words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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
                from lora_train.errors import UserError

                raise UserError(f"no localization '{lang}' (known: {', '.join(available()) or 'none'})")
            self.table = json.loads(path.read_text(encoding="utf-8"))

    def __call__(self, text: str) -> str:
        self.seen.add(text)
        return self.table.get(text, text)

    def format(self, text: str, **values) -> str:
        """A message with numbers, names or paths in it: the template is translated, then filled,
        so word order can follow the language ("{name}" stays where the translation puts it)."""
        return self(text).format(**values)
