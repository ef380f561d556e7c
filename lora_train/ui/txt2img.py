"""A preview prompt line from the txt2img tab's settings, like the WebUI's own training's "Read
parameters (prompt, etc...) from txt2img tab when making previews"."""

from __future__ import annotations

import json


def preview_line(params_json: str) -> str | None:
    """sd-scripts' prompt-line form of what the txt2img tab showed (None when there was nothing)."""
    try:
        p = json.loads(params_json) if params_json else None
    except json.JSONDecodeError:
        return None
    if not isinstance(p, dict) or not str(p.get("prompt") or "").strip():
        return None
    parts = [" ".join(str(p["prompt"]).split())]  # one line: the prompt format is line-based
    negative = " ".join(str(p.get("negative_prompt") or "").split())
    if negative:
        parts.append(f"--n {negative}")
    for key, option, kind in (("width", "w", int), ("height", "h", int), ("steps", "s", int), ("cfg_scale", "l", float), ("seed", "d", int)):
        try:
            value = kind(float(p.get(key)))
        except (TypeError, ValueError):
            continue
        if key == "seed" and value < 0:
            continue  # -1: random, as in txt2img; the run's seed keeps previews comparable instead
        parts.append(f"--{option} {value:g}" if kind is float else f"--{option} {value}")
    sampler = str(p.get("sampler_name") or "").strip()
    if sampler:
        parts.append(f"--ss {sampler}")
    return " ".join(parts)
