"""TOML files: read with a clear error naming the file, written atomically."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lora_train.errors import UserError, msg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 hosts
    import tomli as tomllib


def read_toml(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(msg("{what} '{path}' does not exist", what=what, path=path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(msg("{path}: not valid TOML ({error})", path=path, error=e)) from e


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
