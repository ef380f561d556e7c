"""A published LoRA loaded by the WebUI's own Lora loader: which of its modules the WebUI could not place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lora_train.errors import msg
from lora_train.host.a1111.webui import loaded_model


def self_test(path: Path) -> str:
    """Load a published file with the WebUI's own Lora loader; a message saying what did not match."""
    from lora_train.network.selftest import self_test_message

    try:
        import networks  # the built-in Lora extension's module (kept in sys.modules by the WebUI)
    except ImportError:
        return msg("self-test skipped: the built-in Lora extension of the WebUI is not loaded, so {file} cannot be used in prompts here",
                   file=path.name)
    networks.list_available_networks()
    if loaded_model() is None:
        return msg("self-test skipped: no checkpoint is loaded to test {file} against", file=path.name)
    on_disk = networks.available_networks.get(path.stem)
    if on_disk is None:
        import network

        on_disk = network.NetworkOnDisk(path.stem, str(path))
    return self_test_message(path, unmatched_in_host(networks, path.stem, on_disk))


def unmatched_in_host(networks, name: str, on_disk) -> list[str]:
    """Load a LoRA file with the WebUI's own loader; the file's modules it "didn't match".

    `networks.load_network` only logs the keys it could not place (at DEBUG level), so the log
    call is captured for the duration; and every module it did place carries the file key it came
    from (`network_key`), so the file's other modules are unmatched too should the log text change.
    Returns module names (`lora_unet_...`), sorted.
    """
    capture = _LogCapture(networks.logging)
    networks.logging = capture
    try:
        net = networks.load_network(name, on_disk)
    finally:
        networks.logging = capture.real
    failed: set[str] = set()
    for message in capture.messages:
        failed.update(parse_didnt_match(message))
    placed = [getattr(m, "network_key", None) for m in (getattr(net, "modules", None) or {}).values()]
    if placed and all(placed):
        from lora_train.network.files import load_lora

        tensors, _ = load_lora(on_disk.filename)
        failed |= {k.partition(".")[0] for k in tensors} - {k.partition(".")[0] for k in placed}
    failed.discard("bundle_emb")
    return sorted(failed)


def parse_didnt_match(message: str) -> set[str]:
    """Module names from the loader's "Network FILE didn't match keys: {key: sd_key, ...}"."""
    _, found, rest = message.partition("didn't match keys: ")
    if not found:
        return set()
    try:
        keys = list(ast.literal_eval(rest.strip()))
    except (ValueError, SyntaxError):
        keys = re.findall(r"'([^']+)':", rest)
    return {str(k).partition(".")[0] for k in keys}


class _LogCapture:
    """Stands in for the `logging` module inside `networks` while a file is loaded."""

    def __init__(self, real):
        self.real = real
        self.messages: list[str] = []

    def debug(self, msg, *args, **kwargs):
        try:
            self.messages.append(str(msg) % args if args else str(msg))
        except Exception:
            self.messages.append(str(msg))
        return self.real.debug(msg, *args, **kwargs)

    def __getattr__(self, item):
        return getattr(self.real, item)
