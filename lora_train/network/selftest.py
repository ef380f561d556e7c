"""Does a saved LoRA load onto this model? The modules in the file that the model does not have are
exactly what the WebUI would log as "didn't match keys" and then ignore."""

from __future__ import annotations

from pathlib import Path

from lora_train.errors import msg
from lora_train.network.files import load_lora


def unmatched_modules(path: str | Path, adapter) -> list[str]:
    tensors, _ = load_lora(path)
    known = {t.name for t in adapter.file_targets()}
    in_file = {key.split(".", 1)[0] for key in tensors}
    return sorted(in_file - known)


FAILED = "self-test FAILED"


def check_failed(message: str) -> bool:
    """Whether a host's load-check message (ours, or the WebUI host's) reports a failure."""
    return FAILED in message


def self_test_message(path: str | Path, unmatched: list[str]) -> str:
    name = Path(path).name
    if not unmatched:
        return msg("self-test: {file} loads onto the model with every module matched", file=name)
    shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
    return msg("self-test FAILED: {file} has {count} module(s) the model does not have: {modules}", file=name, count=len(unmatched), modules=shown)
