"""sd-scripts' `--sample_prompts` files: .txt (one prompt a line, with `--w 512 --n ...` options),
.toml (`[prompt]` defaults plus `[[prompt.subset]]` entries) and .json (a list of lines or dicts).

The rules follow sd-scripts' `line_to_prompt_dict` / `load_prompts` / `sample_image_inference`;
where sd-scripts would crash or silently do something odd we say what we do instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_train.errors import UserError, msg
from lora_train.sample.samplers import DEFAULT_SAMPLER

log = logging.getLogger(__name__)

MAX_STEPS = 1000  # sd-scripts clamps `--s` to 1..1000


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None  # None: the caller's default seed (sd-scripts: a random one)
    steps: int = 30
    scale: float = 7.5
    sampler: str = DEFAULT_SAMPLER


# Each option is a " --" separated segment matched at its start, case-insensitively; `re.match`
# takes the leading number, so "--w 512px" is 512. Options sd-scripts knows but we do not use
# (--g, --cn, --ctr, --rcfg, --fs) and unknown ones are ignored, as there.
_OPTIONS = [
    (re.compile(r"w (\d+)", re.I), "width", int),
    (re.compile(r"h (\d+)", re.I), "height", int),
    (re.compile(r"d (\d+)", re.I), "seed", int),
    (re.compile(r"s (\d+)", re.I), "sample_steps", int),
    (re.compile(r"l ([\d.]+)", re.I), "scale", float),
    (re.compile(r"n (.+)", re.I), "negative_prompt", str),
    (re.compile(r"ss (.+)", re.I), "sample_sampler", str),
]


def line_to_dict(line: str) -> dict[str, Any]:
    """One prompt line to sd-scripts' prompt dict keys.

    sd-scripts also matches the options against the prompt segment itself (so a prompt that
    begins "w 512 ..." sets the width); we only look at the segments after the first " --".
    """
    prompt, *segments = line.split(" --")
    out: dict[str, Any] = {"prompt": prompt.strip()}
    for seg in segments:
        for pattern, key, convert in _OPTIONS:
            m = pattern.match(seg)
            if m:
                try:
                    out[key] = convert(m.group(1).strip())
                except ValueError:  # "--l 7.5.1": sd-scripts logs it and carries on
                    log.warning("cannot parse sample prompt option '--%s'", seg)
                break
    return out


def parse_prompt_line(line: str, default_sampler: str = DEFAULT_SAMPLER) -> SamplePrompt:
    return prompt_from_dict(line_to_dict(line), default_sampler)


def prompt_from_dict(d: dict[str, Any], default_sampler: str = DEFAULT_SAMPLER, where: str | None = None) -> SamplePrompt:
    """sd-scripts' prompt dict to a SamplePrompt, with its defaults (512x512, 30 steps, scale 7.5)."""
    where = where or msg("prompt")

    def get(key, convert, default):
        value = d.get(key)
        if value is None:
            return default
        try:
            if isinstance(value, bool) or (convert is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return convert(value)
        except (TypeError, ValueError):
            raise UserError(msg("{where}: '{key}' must be a whole number, not {value}", where=where, key=key, value=repr(value)) if convert is int
                            else msg("{where}: '{key}' must be a number, not {value}", where=where, key=key, value=repr(value))) from None

    if not isinstance(d.get("prompt", ""), str):
        raise UserError(msg("{where}: 'prompt' must be text", where=where))
    return SamplePrompt(
        prompt=d.get("prompt") or "",
        negative=str(d.get("negative_prompt") or ""),
        width=get("width", int, 512),
        height=get("height", int, 512),
        seed=get("seed", int, None),
        steps=max(1, min(MAX_STEPS, get("sample_steps", int, 30))),
        scale=get("scale", float, 7.5),
        sampler=str(d.get("sample_sampler") or default_sampler),
    )


def load_prompts(path: str | os.PathLike, default_sampler: str = DEFAULT_SAMPLER) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise UserError(msg("sample prompts file '{path}' does not exist", path=path))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        entries: list = _read_txt(path)
    elif suffix == ".toml":
        entries = _read_toml(path)
    elif suffix == ".json":
        entries = _read_json(path)
    else:
        raise UserError(msg("sample prompts file '{path}' must be .txt, .toml or .json", path=path))
    prompts = []
    for i, entry in enumerate(entries):
        where = msg("{path}: prompt {number}", path=path, number=i + 1)
        if isinstance(entry, str):
            entry = line_to_dict(entry)
        elif not isinstance(entry, dict):
            raise UserError(msg("{where}: expected a prompt line or a table, not {type}", where=where, type=type(entry).__name__))
        prompts.append(prompt_from_dict(entry, default_sampler, where))
    return prompts


def _read_txt(path: Path) -> list[str]:
    # sd-scripts tests the raw line's first character, so "  # x" is a prompt, not a comment.
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [line.strip() for line in lines if line.strip() and line[0] != "#"]


def _read_toml(path: Path) -> list[dict]:
    from lora_train.tomlfile import read_toml

    data = read_toml(path, "sample prompts file")
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise UserError(msg("{path}: expected a [prompt] table with [[prompt.subset]] entries", path=path))
    defaults = {k: v for k, v in table.items() if k != "subset"}
    # sd-scripts builds dict(**prompt, **subset), which fails when a subset repeats a [prompt]
    # key; here the subset's value wins.
    bad = [i + 1 for i, subset in enumerate(table["subset"]) if not isinstance(subset, dict)]
    if bad:
        raise UserError(msg("{path}: [[prompt.subset]] entry {number} is not a table", path=path, number=bad[0]))
    return [defaults | subset for subset in table["subset"]]


def _read_json(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(msg("{path}: not valid JSON ({error})", path=path, error=e)) from e
    if not isinstance(data, list):
        raise UserError(msg("{path}: expected a list of prompts", path=path))
    return data
