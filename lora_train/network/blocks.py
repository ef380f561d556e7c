"""Block-wise ranks and learning rates, as sd-scripts' `networks/lora.py` defines them for SD1/SD2.

The UNet has 25 blocks: IN00-IN11 (index 0-11; IN00 is conv_in and never has LoRA), MID (12) and
OUT00-OUT11 (13-24). Text-encoder modules have no block (-1).
"""

from __future__ import annotations

import math
import re

from lora_train.errors import UserError

NUM_BLOCKS = 12  # per side
NUM_ALL = 2 * NUM_BLOCKS + 1
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_index(kohya_name: str) -> int:
    m = _UPDOWN.search(kohya_name)
    if m:
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if side == "down" else NUM_BLOCKS + 1 + idx
    if "mid_block_" in kohya_name:
        return NUM_BLOCKS
    return -1


def parse_values(text: str | None, count: int, what: str, cast=float) -> list | None:
    if text is None or str(text).strip() == "":
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if len(parts) != count:
        raise UserError(f"{what} needs {count} comma-separated values (IN00-IN11, MID, OUT00-OUT11), got {len(parts)}")
    try:
        return [cast(float(p)) for p in parts]
    except ValueError:
        raise UserError(f"{what}: '{text}' has a value that is not a number") from None


def dims_and_alphas(block_dims, block_alphas, network_alpha, conv_block_dims, conv_block_alphas, conv_dim, conv_alpha):
    """Per-block (dims, alphas, conv dims, conv alphas); conv falls back to conv_dim for every block."""
    dims = parse_values(block_dims, NUM_ALL, "block_dims", int)
    alphas = parse_values(block_alphas, NUM_ALL, "block_alphas") or [network_alpha] * NUM_ALL
    conv_dims = parse_values(conv_block_dims, NUM_ALL, "conv_block_dims", int)
    if conv_dims is not None:
        conv_alphas = parse_values(conv_block_alphas, NUM_ALL, "conv_block_alphas") or [conv_alpha] * NUM_ALL
    elif conv_dim:
        conv_dims, conv_alphas = [conv_dim] * NUM_ALL, [conv_alpha] * NUM_ALL
    else:
        conv_alphas = None
    return dims, alphas, conv_dims, conv_alphas


def _side_weights(text: str | None, what: str) -> list[float] | None:
    if text is None or str(text).strip() == "":
        return None
    name, _, offset = str(text).partition("+")
    if name in PRESETS:
        base = float(offset) if offset else 0.0
        ramp = [i / (NUM_BLOCKS - 1) for i in range(NUM_BLOCKS)]
        values = {
            "sine": [math.sin(math.pi * r / 2) for r in ramp],
            "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
            "linear": ramp,
            "reverse_linear": list(reversed(ramp)),
            "zeros": [0.0] * NUM_BLOCKS,
        }[name]
        return [v + base for v in values]
    try:
        values = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise UserError(f"{what}: '{text}' is neither {NUM_BLOCKS} numbers nor one of {', '.join(PRESETS)}") from None
    # sd-scripts pads a short list with 1.0 and cuts a long one
    return (values + [1.0] * NUM_BLOCKS)[:NUM_BLOCKS]


class LrWeights:
    """Learning-rate multiplier per UNet block (down_lr_weight / mid_lr_weight / up_lr_weight)."""

    def __init__(self, down: str | None, mid: float | None, up: str | None, zero_threshold: float = 0.0):
        self.down = _side_weights(down, "down_lr_weight")
        self.mid = mid
        self.up = _side_weights(up, "up_lr_weight")
        if zero_threshold:
            self.down = [0.0 if w <= zero_threshold else w for w in self.down] if self.down else None
            self.up = [0.0 if w <= zero_threshold else w for w in self.up] if self.up else None
            if self.mid is not None and self.mid <= zero_threshold:
                self.mid = 0.0

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.down, self.mid, self.up))

    def weight(self, kohya_name: str) -> float:
        idx = block_index(kohya_name)
        if idx < 0:
            return 1.0
        if idx < NUM_BLOCKS:
            return self.down[idx] if self.down else 1.0
        if idx == NUM_BLOCKS:
            return self.mid if self.mid is not None else 1.0
        return self.up[idx - NUM_BLOCKS - 1] if self.up else 1.0
