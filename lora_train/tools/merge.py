"""Merge and subtract LoRAs with SuperMerger's formula: `A:1:GP1,B:-1:GP2`.

The formula's facts come from hako-mikan's sd-webui-supermerger (scripts/mergers/pluslora.py): items
are separated by commas, each `name:ratio` or `name:ratio:preset`, or `name:ratio:v1,v2,...` with a
value list in one of lora-block-weight's layouts (`tools/lbw.py`: 17/26 SD1/SD2, 12/20 SDXL); a
preset's values are multiplied by the ratio, and blocks a layout leaves out get 0.

How the sum is written (ours, not SuperMerger's):
- exact, for LoRA/LoCon inputs: ranks side by side. Module m of input i changes the weight by
  c_i up_i down_i with c_i = ratio_i x block weight_i(m) x alpha_i / rank_i; the merged module has
  up = [c_1 up_1 | c_2 up_2 | ...], down = [down_1; down_2; ...] and alpha = its rank (scale 1), so its
  delta is the weighted sum exactly. A module in one input only is kept (its weighted delta).
- `--rank N`, or inputs of other algorithms (LoHa, LoKr, IA3, OFT, GLoRA, Full, DoRA): each input's
  delta (`tools/deltas.py`), weighted and summed, then the best rank-N approximation of each module
  (SVD; singular values in up; a conv larger than 1x1 as LoCon). SuperMerger also clamps the factors
  at a quantile; we do not, so the error is the SVD tail and nothing else.
Norm modules and Full's bias change have no LoRA form: they are left out, with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_train.errors import UserError, msg
from lora_train.network import algorithms, blocks
from lora_train.network.files import load_lora, save_lora
from lora_train.tools import lbw, lowrank
from lora_train.tools.cards import write_card
from lora_train.tools.checkpoint import check_output
from lora_train.tools.deltas import deltas_of, is_plain_lora


@dataclass
class Item:
    source: str  # as written in the formula
    ratio: float
    weights: str | None = None  # preset name or value list
    path: Path | None = None
    tensors: dict = field(default_factory=dict, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)


def parse_presets(lines: list[str] | None) -> dict[str, str]:
    """`NAME:v1,v2,...` lines (`--preset`, or the extension's preset text) -> {NAME: values}."""
    out = {}
    for line in lines or []:
        for part in str(line).splitlines():
            if not part.strip():
                continue
            name, sep, values = part.partition(":")
            if not sep or not name.strip() or not values.strip():
                raise UserError(msg("--preset '{text}': write NAME:v1,v2,... (lora-block-weight's preset form)", text=part.strip()))
            out[name.strip()] = values.strip()
    return out


def parse_formula(text: str) -> list[Item]:
    """SuperMerger's `name:ratio[:preset|:v1,v2,...]` items, comma-separated."""
    groups: list[list[str]] = []
    for token in str(text).split(","):
        token = token.strip()
        if ":" in token:
            groups.append(_split_item(token))
        elif groups and token:
            groups[-1].append(token)  # the rest of a value list
        elif token:
            raise UserError(msg("merge: '{item}' has no ratio; write NAME:RATIO[:PRESET]", item=token))
    if not groups:
        raise UserError(msg("merge: the formula is empty; write NAME:RATIO[:PRESET],..."))
    items = []
    for parts in groups:
        name, ratio_text, rest = parts[0], parts[1], parts[2:]
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise UserError(msg("merge: '{item}': the ratio '{ratio}' is not a number", item=":".join(parts[:2]), ratio=ratio_text)) from None
        items.append(Item(name, ratio, ",".join(rest) if rest else None))
    return items


def _split_item(token: str) -> list[str]:
    parts = token.split(":")
    if len(parts) > 2 and len(parts[0]) == 1 and parts[1][:1] in ("\\", "/"):  # a Windows drive letter
        parts = [parts[0] + ":" + parts[1]] + parts[2:]
    return [p.strip() for p in parts]


def resolve(name: str, lora_dir: Path) -> Path:
    """A formula's LoRA: a path, or a name in the LoRA folder (its subfolders too, as the WebUI lists them)."""
    for candidate in (Path(name), Path(name + ".safetensors"), lora_dir / name, lora_dir / (name + ".safetensors")):
        if candidate.is_file():
            return candidate
    found = sorted(p for p in lora_dir.rglob("*.safetensors") if p.stem == name) if lora_dir.is_dir() else []
    if found:
        return found[0]
    raise UserError(msg("merge: no LoRA named '{name}' (neither a file nor in {folder})", name=name, folder=lora_dir))


def module_factors(item: Item, presets: dict[str, str], sdxl: bool) -> dict[str, float]:
    """ratio x block weight of each of the item's modules."""
    names = algorithms.group(item.tensors)
    if item.weights is None:
        return {n: item.ratio for n in names}
    weights = lbw.parse_weights(item.weights, sdxl, presets, what=item.source)
    return {n: item.ratio * w for n, w in lbw.module_weights(names, weights, sdxl).items()}


def merge(formula: str, output: str | Path, presets: dict[str, str] | None = None, rank: int | None = None,
          lora_dir: str | Path | None = None, targets=None) -> tuple[Path, list[str]]:
    """Write the merged LoRA to `output`; returns its path and notes. `targets`: the model's
    (`adapter.file_targets()`) when given, for algorithms whose delta reads the base weight."""
    presets = presets or {}
    folder = Path(lora_dir) if lora_dir else Path.cwd()
    items = parse_formula(formula)
    for item in items:
        item.path = resolve(item.source, folder)
    output = check_output(output, [item.path for item in items])
    for item in items:
        tensors, item.metadata = load_lora(item.path)
        algorithms.check_keys(tensors)
        item.tensors = tensors
    families = {blocks.layout_of(algorithms.group(i.tensors)) is blocks.SDXL for i in items}
    if len(families) > 1:
        raise UserError(msg("merge: the inputs are of different model families (SDXL and SD1/SD2)"))
    sdxl = families.pop()
    factors = [module_factors(item, presets, sdxl) for item in items]
    notes: list[str] = []
    exact = rank is None and all(is_plain_lora(i.tensors) for i in items)
    if exact:
        state = _concatenated(items, factors)
    else:
        if rank is None:
            kinds = sorted({i.source for i in items if not is_plain_lora(i.tensors)})
            raise UserError(msg("merge: {names} are not plain LoRA/LoCon, so they merge through their deltas: give --rank N",
                                names=", ".join(kinds)))
        if rank < 1:
            raise UserError(msg("--rank must be at least 1, got {rank}", rank=rank))
        state = _svd_of_sum(items, factors, rank, targets, notes)
    if not state:
        raise UserError(msg("merge: every module's weight is 0 in this formula: nothing to write"))
    path = save_lora(output, state, _metadata(items, state, rank, Path(output).stem))
    how = msg("ranks concatenated (exact)") if exact else msg("SVD to rank {rank}", rank=rank)
    write_card(path, "sdxl" if sdxl else None, msg("merged from {formula}: {how}", formula=formula, how=how), source=items[0].path)
    return path, notes


def _float_dtype(items: list[Item]) -> torch.dtype:
    dtype = torch.float16
    for item in items:
        for v in item.tensors.values():
            if v.is_floating_point():
                dtype = torch.promote_types(dtype, v.dtype)
    return dtype


def _concatenated(items: list[Item], factors: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    dtype = _float_dtype(items)
    names = dict.fromkeys(n for item in items for n in algorithms.group(item.tensors))
    state: dict[str, torch.Tensor] = {}
    for name in names:
        ups, downs = [], []
        for item, factor in zip(items, factors):
            if f"{name}.lora_down.weight" not in item.tensors or not factor.get(name):
                continue
            down = item.tensors[f"{name}.lora_down.weight"].float()
            up = item.tensors[f"{name}.lora_up.weight"].float()
            r = down.shape[0]
            alpha = item.tensors.get(f"{name}.alpha")
            alpha = float(alpha) if alpha is not None and float(alpha) != 0 else float(r)  # sd-scripts: none means scale 1
            ups.append(up * (factor[name] * alpha / r))
            downs.append(down)
        if not ups:
            continue
        conv = max(d.dim() for d in downs) == 4
        if conv:  # LyCORIS may write a 1x1 conv's factors 2-D
            downs = [d if d.dim() == 4 else d[:, :, None, None] for d in downs]
            ups = [u if u.dim() == 4 else u[:, :, None, None] for u in ups]
        shapes = {tuple(d.shape[1:]) for d in downs} | {("out", u.shape[0]) for u in ups}
        if len(shapes) != 2:
            raise UserError(msg("merge: {name} has other shapes in the inputs ({shapes}): they are LoRAs of different models",
                                name=name, shapes=", ".join(str(tuple(d.shape)) for d in downs)))
        down, up = torch.cat(downs, 0), torch.cat(ups, 1)
        state[f"{name}.lora_down.weight"] = down.to(dtype)
        state[f"{name}.lora_up.weight"] = up.to(dtype)
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return state


def _svd_of_sum(items: list[Item], factors: list[dict[str, float]], rank: int, targets, notes: list[str]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for item, factor in zip(items, factors):
        floats = {k: v.float() if v.is_floating_point() else v for k, v in item.tensors.items()}
        deltas = deltas_of(floats, item.metadata, str(item.path), targets)
        for name, delta in deltas.items():
            if factor.get(name):
                total[name] = total[name] + factor[name] * delta if name in total else factor[name] * delta
        left = sorted({algorithms.split_key(k)[0] for k, v in item.tensors.items() if k.endswith(("w_norm", "diff_b"))})
        if left:
            notes.append(msg("{path}: {count} norm or bias changes have no LoRA form and are left out (first: {name})",
                             path=item.path, count=len(left), name=left[0]))
    dtype = _float_dtype(items)
    state = {}
    for name, delta in total.items():
        if delta.dim() < 2:
            continue  # a norm's weight change
        down, up = lowrank.kohya_shapes(lowrank.factorize(delta.reshape(delta.shape[0], -1), rank), delta.shape)
        state[f"{name}.lora_down.weight"] = down.to(dtype)
        state[f"{name}.lora_up.weight"] = up.to(dtype)
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return state


def _metadata(items: list[Item], state: dict[str, torch.Tensor], rank: int | None, name: str) -> dict[str, str]:
    ranks = {k: v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    conv = {k: r for k, r in ranks.items() if state[k].dim() == 4 and tuple(state[k].shape[2:]) != (1, 1)}
    linear = [r for k, r in ranks.items() if k not in conv]
    dim = max(linear) if linear else max(ranks.values())
    out = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(dim), "ss_output_name": name}
    if conv:
        conv_dim = max(conv.values())
        out["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)})
    first = items[0].metadata
    for key in ("ss_base_model_version", "ss_v2", "modelspec.architecture", "ss_sd_model_name"):
        if key in first:
            out[key] = first[key]
    out["lora_train_merged_from"] = json.dumps({
        "inputs": [{"file": i.path.name, "ratio": i.ratio, "weights": i.weights, "sshs_model_hash": i.metadata.get("sshs_model_hash")}
                   for i in items],
        "method": f"svd rank {rank}" if rank else "exact (ranks concatenated)"}, ensure_ascii=False)
    return out
