"""Block weights as hako-mikan's lora-block-weight extension gives them, baked into a new file.

The extension's facts (scripts/lora_block_weight.py):
- four layouts, told apart by how many values there are: 17 (SD1/SD2 LoRA: BASE, IN01, IN02, IN04,
  IN05, IN07, IN08, M00, OUT03-OUT11), 26 (SD1/SD2 with LoCon: BASE, IN00-IN11, M00, OUT00-OUT11), 12
  (SDXL LoRA: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05) and 20 (SDXL with LoCon: BASE, IN00-IN08,
  M00, OUT00-OUT08);
- BASE is every text-encoder module; INnn / M00 / OUTnn are the UNet's input_blocks_nn /
  middle_block / output_blocks_nn in the WebUI's (LDM) names. sd-scripts names SD1/SD2 modules
  diffusers-style: down_blocks_i attentions/resnets_j is input_blocks_(3i+j+1), its downsampler
  input_blocks_(3i+3), up_blocks_i attentions/resnets_j is output_blocks_(3i+j), its upsampler
  output_blocks_(3i+2) (`network/blocks.py`); SDXL's names are the LDM paths already;
- a shorter layout is spread over the 26 blocks with 0 for the blocks it does not list (`to26`): a
  17-value weight on a LoCon file switches its IN00/IN03/IN06/IN09-IN11/OUT00-OUT02 convs off;
- a module in no block keeps its weight (1);
- its default presets (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5), 17 values each.

Baking scales each module's tensors so its delta scales by its block's value, 0 and negative values
included: LoRA/LoCon `lora_up` (not alpha, which would flip no sign), LoHa `hada_w1_a`, LoKr `w1`,
IA3 `weight`, GLoRA `a1` and `b1`, Full `diff` (and `diff_b`), norms `w_norm` and `b_norm`. OFT and
DoRA change the weight non-linearly in theirs: a value other than 1 on one of them is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lora_train.errors import UserError, msg
from lora_train.network import algorithms, blocks
from lora_train.network.files import load_lora, save_lora
from lora_train.network.oft import BOFT, DiagOFT
from lora_train.tools.cards import write_card
from lora_train.tools.checkpoint import check_output

BLOCKID26 = ["BASE"] + [f"IN{i:02}" for i in range(12)] + ["M00"] + [f"OUT{i:02}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(3, 12)]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(6)]
BLOCKID20 = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]
LAYOUTS = {"sd": {17: BLOCKID17, 26: BLOCKID26}, "sdxl": {12: BLOCKID12, 20: BLOCKID20}}

PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}

_SDXL_PART = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_")


def block_of(name: str, sdxl: bool) -> str | None:
    """The lora-block-weight block of a kohya module name (BASE, IN04, M00, OUT11 ...), None for none."""
    if not name.startswith("lora_unet_"):
        return "BASE" if name.startswith("lora_te") else None
    if sdxl:
        m = _SDXL_PART.match(name)
        if not m:
            return None
        kind, number = m.group(1), int(m.group(2))
        return "M00" if kind == "middle_block" else f"{'IN' if kind == 'input_blocks' else 'OUT'}{number:02}"
    idx = blocks.block_index(name)  # IN00-IN11 = 0-11, MID = 12, OUT00-OUT11 = 13-24
    if idx < 0:
        return None
    return f"IN{idx:02}" if idx < blocks.NUM_BLOCKS else "M00" if idx == blocks.NUM_BLOCKS else f"OUT{idx - blocks.NUM_BLOCKS - 1:02}"


def parse_weights(text: str, sdxl: bool, presets: dict[str, str] | None = None, what: str = "--weights") -> dict[str, float]:
    """{block id: value} of a preset name or a value list, every block of the 26 (0 where the
    layout leaves it out, as the extension's `to26`)."""
    return to26(dict(layout_values(text, sdxl, presets, what)))


def to26(listed: dict[str, float]) -> dict[str, float]:
    return {block: listed.get(block, 0.0) for block in BLOCKID26}


def layout_values(text: str, sdxl: bool, presets: dict[str, str] | None = None, what: str = "--weights") -> list[tuple[str, float]]:
    """(block id, value) of the blocks a preset name or value list gives, in its layout's order."""
    text = text.strip()
    known = {**PRESETS, **(presets or {})}
    parts = [p.strip() for p in known.get(text, text).split(",") if p.strip()]
    family = "sdxl" if sdxl else "sd"
    ids = LAYOUTS[family].get(len(parts))
    if ids is None:
        counts = " or ".join(str(n) for n in LAYOUTS[family])
        if len(parts) == 1 and not _number(parts[0]):
            raise UserError(msg("{key}: '{text}' is neither a preset ({presets}) nor {counts} comma-separated values",
                                key=what, text=text, presets=", ".join(known), counts=counts))
        raise UserError(msg("{key}: '{text}' has {got} values; {family} block weights take {counts} (lora-block-weight's layouts)",
                            key=what, text=text, got=len(parts), family="SDXL" if sdxl else "SD1/SD2", counts=counts))
    bad = [p for p in parts if not _number(p)]
    if bad:
        raise UserError(msg("{key}: '{value}' is not a number", key=what, value=bad[0]))
    return list(zip(ids, (float(p) for p in parts)))


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def module_weights(names, weights: dict[str, float], sdxl: bool) -> dict[str, float]:
    """The value of each module name (1 for a module in no block)."""
    out = {}
    for name in names:
        block = block_of(name, sdxl)
        out[name] = 1.0 if block is None else weights[block]
    return out


def scale_module(name: str, module: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """A module's tensors (by suffix) with its delta scaled by `value`."""
    if value == 1.0:
        return dict(module)
    owners = {algorithms.owner(s) for s in module if s not in ("alpha", *algorithms.SHARED_SUFFIXES)}
    cls = next(iter(owners)) if len(owners) == 1 else None
    if "dora_scale" in module or cls in (DiagOFT, BOFT):
        kind = "DoRA" if "dora_scale" in module else cls.algorithm
        raise UserError(msg("{name}: {algorithm} changes the weight non-linearly, so a block weight of {value:g} cannot be baked into it",
                            name=name, algorithm=kind, value=value))
    if cls is None or not cls.SCALES_WITH:
        raise UserError(msg("{name}: no algorithm LoRA Train loads has the keys {keys}", name=name, keys=", ".join(sorted(module))))
    keys = [k for k in cls.SCALES_WITH if k in module]
    out = dict(module)
    for key in keys:
        out[key] = (module[key].float() * value).to(module[key].dtype)
    return out


def bake(src: str | Path, dst: str | Path, weights_text: str, presets: dict[str, str] | None = None) -> tuple[Path, list[str]]:
    """Write `dst`: `src` with its block weights baked in. Returns the path and notes."""
    dst = check_output(dst, [src])
    tensors, metadata = load_lora(src)
    algorithms.check_keys(tensors)
    modules = algorithms.group(tensors)
    sdxl = blocks.layout_of(modules) is blocks.SDXL
    listed = dict(layout_values(weights_text, sdxl, presets))
    values = module_weights(modules, to26(listed), sdxl)
    out: dict[str, torch.Tensor] = {}
    for name, suffixes in modules.items():
        scaled = scale_module(name, {s: tensors[f"{name}.{s}"] for s in suffixes}, values[name])
        out.update({f"{name}.{s}": v for s, v in scaled.items()})
    notes = []
    dropped = sorted({block_of(n, sdxl) for n in modules} - set(listed) - {None}, key=BLOCKID26.index)
    if dropped:
        notes.append(msg("the file has modules in {blocks}, which this layout does not list: they get 0, as in lora-block-weight",
                         blocks=", ".join(dropped)))
    record = {"weights": weights_text.strip(), "blocks": listed, "source": Path(src).name}
    path = save_lora(dst, out, dict(metadata) | {"lora_train_lbw": json.dumps(record)})
    write_card(path, "sdxl" if sdxl else None, msg("{source} with the block weights {weights}", source=Path(src).name,
                                                   weights=weights_text.strip()), source=Path(src))
    return path, notes

