"""Errors a user can act on, and the messages a user reads. The CLI and the UI print them without a
traceback, in the user's language where a translation exists (`ui/i18n.py`)."""

import difflib
from typing import Iterable


def msg(template: str, /, **values) -> str:
    """A message for the user, in English with its values filled in.

    The template is the key of its translation in `localizations/*.json` (placeholders included,
    `{path}: no such folder`), and the front ends translate the finished English text by matching it
    against those templates, line by line (`Translator.text`), so a message can be joined, listed
    and passed on as a plain string. `tests/test_localization.py` finds every `msg("...")` and
    checks the translations have it, with the same placeholders."""
    return template.format(**values) if values else template


class UserError(Exception):
    """Bad input: the message names the file or key and says what is wrong."""


def close_match_hint(word: str, choices: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return " " + msg("(did you mean '{match}'?)", match=matches[0]) if matches else ""
