"""Block-wise ranks and learning rates, as sd-scripts' `networks/lora.py` defines them.

Two layouts, told apart by the module names (`layout_of`):
- SD1/SD2 (diffusers-style names, `down_blocks_1_attentions_0_...`): 25 blocks, IN00-IN11 (index
  0-11; IN00 is conv_in and never has LoRA), MID (12) and OUT00-OUT11 (13-24). down/up LR weights
  take 12 values each, mid_lr_weight one.
- SDXL (LDM names, `input_blocks_4_1_...`): 23 blocks, BASE (0: time/label embedding, no LoRA),
  IN00-IN08 (1-9, input_blocks_N), MID00-MID02 (10-12, middle_block_N), OUT00-OUT08 (13-21,
  output_blocks_N) and OUT (22: the output layers, no LoRA). down/up LR weights take 9 values each;
  mid_lr_weight covers MID00-MID02 (one value for all three, or three values).
Text-encoder modules have no block (-1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from lora_train.errors import UserError, msg

NUM_BLOCKS = 12  # per side, SD1/SD2
NUM_ALL = 2 * NUM_BLOCKS + 1
SDXL_NUM_BLOCKS = 9  # per side, SDXL
SDXL_NUM_MID = 3
SDXL_NUM_ALL = 1 + 2 * SDXL_NUM_BLOCKS + SDXL_NUM_MID + 1
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_SDXL_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_\d+_")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_index(kohya_name: str) -> int:
    """SD1/SD2 block of a UNet module name (diffusers-style), -1 when it has none."""
    m = _UPDOWN.search(kohya_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
    if "mid_block_" in kohya_name:
        return NUM_BLOCKS
    return -1


def sdxl_block_index(kohya_name: str) -> int:
    """SDXL block of a UNet module name (LDM path), -1 when it has none."""
    if not kohya_name.startswith("lora_unet_"):
        return -1
    name = kohya_name[len("lora_unet_"):]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, first in (("input_blocks_", 1), ("middle_block_", 1 + SDXL_NUM_BLOCKS), ("output_blocks_", 1 + SDXL_NUM_BLOCKS + SDXL_NUM_MID)):
        if name.startswith(prefix):
            number = name[len(prefix):].split("_", 1)[0]
            return first + int(number) if number.isdigit() else -1
    if name.startswith("out_"):
        return SDXL_NUM_ALL - 1
    return -1


@dataclass(frozen=True)
class Layout:
    """The blocks of one UNet family, in the order block-wise values are given."""

    name: str
    side: int  # blocks per side (down/up LR weights)
    mid: int  # middle blocks
    ends: bool  # a BASE block before and an OUT block after (SDXL)
    labels: str  # the value order, for messages
    side_labels: tuple[str, str]  # down, up
    index: Callable[[str], int]

    @property
    def total(self) -> int:
        return 2 * self.side + self.mid + (2 if self.ends else 0)


SD = Layout("SD1/SD2", NUM_BLOCKS, 1, False, "IN00-IN11, MID, OUT00-OUT11", ("IN00-IN11", "OUT00-OUT11"), block_index)
SDXL = Layout("SDXL", SDXL_NUM_BLOCKS, SDXL_NUM_MID, True, "BASE, IN00-IN08, MID00-MID02, OUT00-OUT08, OUT",
              ("IN00-IN08", "OUT00-OUT08"), sdxl_block_index)


def layout_of(names: Iterable[str]) -> Layout:
    """SDXL when the modules are SDXL's (LDM UNet paths, or the two text encoders' prefixes), else SD1/SD2."""
    for name in names:
        if name.startswith(("lora_te1_", "lora_te2_")) or _SDXL_UNET.match(name):
            return SDXL
    return SD


def parse_values(text: str | None, layout: Layout, what: str, cast=float) -> list | None:
    if text is None or str(text).strip() == "":
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) != layout.total:
        raise UserError(msg("{key} needs {count} comma-separated values on {layout} ({labels}), got {got}", key=what, count=layout.total,
                            layout=layout.name, labels=layout.labels, got=len(parts)))
    try:
        return [cast(float(p)) for p in parts]
    except ValueError:
        raise UserError(msg("{key}: '{text}' has a value that is not a number", key=what, text=text)) from None


def dims_and_alphas(block_dims, block_alphas, network_alpha, conv_block_dims, conv_block_alphas, conv_dim, conv_alpha,
                    layout: Layout = SD):
    """Per-block (dims, alphas, conv dims, conv alphas); conv falls back to conv_dim for every block."""
    n = layout.total
    dims = parse_values(block_dims, layout, "block_dims", int)
    alphas = parse_values(block_alphas, layout, "block_alphas") or [network_alpha] * n
    conv_dims = parse_values(conv_block_dims, layout, "conv_block_dims", int)
    if conv_dims is not None:
        conv_alphas = parse_values(conv_block_alphas, layout, "conv_block_alphas") or [conv_alpha] * n
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha] * n
    else:
        conv_alphas = None
    return dims, alphas, conv_dims, conv_alphas


def _blank(value) -> bool:
    return value is None or str(value).strip() == ""


def _side_weights(text: str | None, what: str, layout: Layout, labels: str) -> list[float] | None:
    if _blank(text):
        return None
    count = layout.side
    name, _, offset = str(text).partition("+")
    if name in PRESETS:
        base = float(offset) if offset else 0.0
        ramp = [i / (count - 1) for i in range(count)]
        values = {
            "sine": [math.sin(math.pi * r / 2) for r in ramp],
            "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
            "linear": ramp,
            "reverse_linear": list(reversed(ramp)),
            "zeros": [0.0] * count,
        }[name]
        return [v + base for v in values]
    try:
        values = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise UserError(msg("{key}: '{text}' is neither {count} numbers nor one of {presets}", key=what, text=text, count=count,
                            presets=", ".join(PRESETS))) from None
    if layout is SD:
        # sd-scripts pads a short list with 1.0 and cuts a long one
        return (values + [1.0] * count)[:count]
    if len(values) != count:
        raise UserError(msg("{key} needs {count} comma-separated values on {layout} ({labels}) or one of {presets}, got {got}", key=what,
                            count=count, layout=layout.name, labels=labels, presets=", ".join(PRESETS), got=len(values)))
    return values


def _mid_weights(mid, layout: Layout) -> list[float] | None:
    if _blank(mid):
        return None
    try:
        values = [float(p) for p in str(mid).split(",") if p.strip()]
    except ValueError:
        raise UserError(msg("mid_lr_weight: '{text}' is not a number", text=mid)) from None
    if len(values) == 1:
        return values * layout.mid  # on SDXL one value is the whole middle block (MID00-MID02)
    if len(values) != layout.mid:
        raise UserError(msg("mid_lr_weight needs 1 or {count} comma-separated values on {layout}, got {got}", count=layout.mid, layout=layout.name,
                            got=len(values)))
    return values


class LrWeights:
    """Learning-rate multiplier per UNet block (down_lr_weight / mid_lr_weight / up_lr_weight).

    The values are read for a layout: SD1/SD2 until `bind` (LoRANetwork binds it to its targets'
    layout, which checks the counts)."""

    def __init__(self, down: str | None, mid: float | str | None, up: str | None, zero_threshold: float = 0.0):
        self._given = (down, mid, up)
        self.zero_threshold = zero_threshold
        self.layout = SD
        self._parsed: tuple | None = None

    def bind(self, layout: Layout) -> "LrWeights":
        self.layout = layout
        self._parsed = None
        self._values()  # a wrong count or a bad value is an error now, not at the first step
        return self

    def _values(self) -> tuple:
        if self._parsed is None:
            down, mid, up = self._given
            layout = self.layout
            parsed = [_side_weights(down, "down_lr_weight", layout, layout.side_labels[0]), _mid_weights(mid, layout),
                      _side_weights(up, "up_lr_weight", layout, layout.side_labels[1])]
            if self.zero_threshold:
                parsed = [[0.0 if w <= self.zero_threshold else w for w in values] if values else None for values in parsed]
            self._parsed = tuple(parsed)
        return self._parsed

    @property
    def down(self) -> list[float] | None:
        return self._values()[0]

    @property
    def mid(self) -> float | list[float] | None:
        values = self._values()[1]
        return values[0] if values is not None and self.layout.mid == 1 else values

    @property
    def up(self) -> list[float] | None:
        return self._values()[2]

    @property
    def active(self) -> bool:
        return not all(_blank(v) for v in self._given)

    def per_block(self) -> list[float]:
        """The multiplier of every block of the layout, in its order (1.0 where none is given)."""
        down, mid, up = self._values()
        layout = self.layout
        ends = [1.0] if layout.ends else []
        return (ends + (down or [1.0] * layout.side) + (mid or [1.0] * layout.mid) + (up or [1.0] * layout.side) + ends)

    def weight(self, kohya_name: str) -> float:
        idx = self.layout.index(kohya_name)
        return 1.0 if idx < 0 else self.per_block()[idx]
