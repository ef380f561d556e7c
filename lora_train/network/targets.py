"""Which modules a LoRA trains, chosen the way sd-scripts' `networks/lora.py` chooses them.

A target is a Linear or Conv2d inside a module of a target class: the UNet's transformer blocks
(plus, with `conv_dim`, its resnets and down/upsamplers), and the text encoder's attention and MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lora_train.network.naming import PREFIX_UNET, kohya_name, ldm_unet_path_to_diffusers

UNET_BLOCKS = ("SpatialTransformer",)
UNET_CONV_BLOCKS = ("ResBlock", "Downsample", "Upsample")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass
class Target:
    name: str  # kohya name
    module: nn.Module
    path: str  # path in the model it was found in

    @property
    def is_conv3x3(self) -> bool:
        """Convs with a kernel larger than 1x1 train with conv_dim (LoCon); the rest with network_dim."""
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _collect(root: nn.Module, block_classes: tuple[str, ...], name_of: Callable[[str, str, str], str]) -> list[Target]:
    found: dict[str, Target] = {}
    for block_path, block in root.named_modules():
        cls = type(block).__name__
        if cls not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            name = name_of(block_path, cls, child_path)
            found.setdefault(name, Target(name, child, f"{block_path}.{child_path}"))
    return list(found.values())


def ldm_unet_targets(unet: nn.Module, conv: bool = False) -> list[Target]:
    """Targets in an ldm `UNetModel` (SD1/SD2), with sd-scripts' diffusers-style names."""
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())

    def name_of(block_path: str, cls: str, child_path: str) -> str:
        return kohya_name(PREFIX_UNET, ldm_unet_path_to_diffusers(block_path, cls, child_path))

    targets = _collect(unet, blocks, name_of)
    return [t for t in targets if conv or not t.is_conv3x3]


def hf_clip_targets(text_model: nn.Module, prefix: str) -> list[Target]:
    """Targets in a Hugging Face `CLIPTextModel`; names are its own module paths."""
    return _collect(text_model, TEXT_BLOCKS, lambda block_path, cls, child: kohya_name(prefix, f"{block_path}.{child}"))
