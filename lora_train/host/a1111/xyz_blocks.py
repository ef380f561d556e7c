"""The X/Y/Z axis "[LoRA Train] block weights": each cell renders our LoRA with lora-block-weight's
block weights (a preset name or a value list) baked into a copy of it.

The WebUI v1.10's built-in Lora extension has no per-block weights in `<lora:...>`, so a cell's
weights are baked (`tools/lbw.py`) into a file of their own and the prompt's tag is pointed at it:
- the copies live in `<WebUI data dir>/lora_train/lbw-cache`, beside our runs folder: the Lora
  extension scans only models/Lora (and models/LyCORIS), so they never clutter the user's LoRA list
  or cards, the data dir is writable and survives extension updates (unlike the extension's own
  folder), and the WebUI does not empty it at start (unlike its tmp folder);
- a copy is named by a hash of the source (resolved path, mtime, size: a re-published LoRA is a new
  source) and the block values (a preset and its value list are one copy), so it is baked once and
  reused for every cell, grid and session;
- the tag becomes `<lora:NAME_lbw_<hash8>:w>`, an alias we register with the built-in extension.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora_train.errors import UserError, msg
from lora_train.host.a1111.webui import lora_dir
from lora_train.host.a1111.xyz import XYZ_BLOCKS, find_tag, no_lora_chosen, xyz_lora_name
from lora_train.network import algorithms, blocks
from lora_train.tools import lbw

_registered: dict[str, object] = {}  # alias -> the built-in extension's NetworkOnDisk of its baked copy
_sources: dict[str, str] = {}  # alias -> the LoRA name it was baked from


def cache_dir() -> Path:
    from modules import paths

    return Path(paths.data_path) / "lora_train" / "lbw-cache"


def preset_names() -> list[str]:
    return list(lbw.PRESETS)


def format_block_weights(p, opt, x) -> str:
    """The grid label: the preset name or the value list, as typed."""
    return str(x).strip()


def lora_file(name: str) -> Path:
    """The file the WebUI loads for `<lora:name>`: the built-in extension's entry, else the LoRA folder's file."""
    try:
        import networks

        entry = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
    except Exception:
        entry = None
    if entry is not None:
        return Path(entry.filename)
    folder = lora_dir()
    found = sorted(p for p in folder.rglob(f"{name}.safetensors") if p.is_file()) if folder.is_dir() else []
    if not found:
        raise RuntimeError(msg("{axis}: no LoRA named {name} in {folder}", axis=XYZ_BLOCKS, name=name, folder=folder))
    return found[0]


def baked_alias(name: str, weights: str) -> str:
    """The registered alias of LoRA `name` with `weights` baked in (baked now, or found in the cache)."""
    src = lora_file(name)
    try:
        from safetensors import safe_open

        with safe_open(str(src), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as e:
        raise RuntimeError(msg("{axis}: '{path}' cannot be read as safetensors ({error})", axis=XYZ_BLOCKS, path=src, error=e)) from None
    sdxl = blocks.layout_of(algorithms.group(keys)) is blocks.SDXL  # the family lbw.bake will see
    try:
        listed = lbw.layout_values(weights, sdxl, what=f"{XYZ_BLOCKS} ({src})")
    except UserError as e:
        raise RuntimeError(str(e)) from None
    st = src.stat()
    key = json.dumps([str(src.resolve()), st.st_mtime_ns, st.st_size, listed])
    alias = f"{name}_lbw_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    out = cache_dir() / f"{alias}.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            lbw.bake(src, out, weights)
        except UserError as e:  # OFT / DoRA with a value other than 1, keys no algorithm owns ...
            raise RuntimeError(msg("{axis} on {path}: {error}", axis=XYZ_BLOCKS, path=src, error=e)) from None
    register(alias, out)
    _sources[alias] = name
    return alias


def register(alias: str, path: Path) -> None:
    """Make `<lora:alias>` load `path`.

    Only `available_network_aliases` gets the entry: it is all `networks.load_networks` looks a
    name up in, while `available_networks` is what the Lora cards and the "Add network to prompt"
    setting list, where the cached copies would be clutter. `load_networks` calls
    `list_available_networks()`, which clears the dicts and rescans models/Lora, whenever any name
    of the prompt is missing (another LoRA's typo is enough), and looks the names up again right
    after: so that function is wrapped, once, to put our entries back after every rescan. It is the
    module's global, which `load_networks` looks up at call time, so the wrapper covers that call,
    the Lora tab's refresh button and anything else calling `networks.list_available_networks`.
    A caller holding the original (the settings' refresh) only drops them until the next
    `load_networks` of an alias, which finds it missing and rescans through the wrapper."""
    try:
        import network
        import networks
    except ImportError:
        raise RuntimeError(msg("The WebUI's built-in Lora extension is disabled: <lora:...> prompts do nothing.")) from None
    entry = _registered.get(alias)
    if entry is None or Path(entry.filename) != path:
        entry = _registered[alias] = network.NetworkOnDisk(alias, str(path))
    _keep_through_rescans(networks)
    networks.available_network_aliases[alias] = entry


def _keep_through_rescans(networks) -> None:
    original = networks.list_available_networks
    if getattr(original, "_lora_train_keeps_lbw", False):
        return

    def list_available_networks(*args, **kwargs):
        result = original(*args, **kwargs)
        for alias, entry in _registered.items():
            if Path(entry.filename).is_file():
                networks.available_network_aliases.setdefault(alias, entry)
        return result

    list_available_networks._lora_train_keeps_lbw = True
    networks.list_available_networks = list_available_networks


def _our_tag(prompt: str, target: str):
    """The `<lora:...>` tag the axes act on (as the weight axis finds it), or None."""
    return find_tag(prompt, [target] if target else [], xyz_lora_name())


def _source_name(p) -> str:
    m = _our_tag(p.prompt, getattr(p, "_lora_train_lora", ""))
    name = m.group(2) if m is not None else xyz_lora_name()
    if not name:
        raise no_lora_chosen(XYZ_BLOCKS)
    return _sources.get(name, name)


def apply_block_weights(p, x, xs) -> None:
    """Point our LoRA's tag at its copy with the block weights `x` (appending `<lora:alias:1>` when
    the prompt has none). Remembered on `p`, so the checkpoint axis can bake its file the same way."""
    weights = str(x)
    alias = baked_alias(_source_name(p), weights)
    m = _our_tag(p.prompt, getattr(p, "_lora_train_lora", ""))
    if m is None:
        p.prompt = f"{p.prompt} <lora:{alias}:1>"
    else:
        tag = f"<{m.group(1)}:{alias}" + (f":{m.group(3)}" if m.group(3) is not None else "") + f"{m.group(4) or ''}>"
        p.prompt = p.prompt[:m.start()] + tag + p.prompt[m.end():]
    p._lora_train_lora = alias
    p._lora_train_lbw = weights


def confirm_block_weights(p, xs) -> None:
    """Bake every value before the first cell, so a value that does not fit the file fails now,
    naming the file. Without a LoRA to tell yet (the checkpoint axis adds it), each value must fit
    SD1/SD2 or SDXL."""
    prompt = getattr(p, "prompt", "") or ""
    m = _our_tag(prompt, "")
    name = m.group(2) if m is not None else xyz_lora_name()
    for x in xs:
        if name:
            baked_alias(_sources.get(name, name), str(x))
            continue
        try:
            lbw.layout_values(str(x), False, what=XYZ_BLOCKS)
        except UserError as e:
            try:
                lbw.layout_values(str(x), True, what=XYZ_BLOCKS)
            except UserError:
                raise RuntimeError(str(e)) from None
