"""Errors a user can act on. The CLI and the UI print their message without a traceback."""

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input: the message names the file or key and says what is wrong."""


def close_match_hint(word: str, choices: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{matches[0]}'?)" if matches else ""
