"""Which modules a LoRA trains, chosen the way sd-scripts' `networks/lora.py` chooses them.

A target is a Linear or Conv2d inside a module of a target class: the UNet's transformer blocks
(plus, with `conv_dim`, its resnets and down/upsamplers), and the text encoder's attention and MLP.
OpenCLIP text encoders (SD2, SDXL's second) are named as sd-scripts names them, in the Hugging Face
layout, with the fused attention split into its q/k/v/out parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lora_train.network.naming import PREFIX_UNET, kohya_name, ldm_unet_path_to_diffusers

UNET_BLOCKS = ("SpatialTransformer",)
UNET_CONV_BLOCKS = ("ResBlock", "Downsample", "Upsample")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def is_linear(m: nn.Module) -> bool:
    """A Linear layer: torch's, or one that only looks like it (Forge builds its models with its own
    `Linear`, a plain `nn.Module` with `in_features`, `out_features` and a 2-D `weight`)."""
    if isinstance(m, nn.Linear):
        return True
    weight = getattr(m, "weight", None)
    return (type(m).__name__ == "Linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and hasattr(m, "in_features") and hasattr(m, "out_features"))


def is_trainable_layer(m: nn.Module) -> bool:
    """What a LoRA target is: a Linear (`is_linear`) or a Conv2d."""
    return is_linear(m) or isinstance(m, nn.Conv2d)


@dataclass
class Target:
    name: str  # kohya name
    module: nn.Module
    path: str  # path in the model it was found in
    part: str | None = None  # q/k/v/out of a fused nn.MultiheadAttention (OpenCLIP)
    block: str = ""  # the class of the block it was found in (`SpatialTransformer`, `ResBlock`, `CLIPAttention` ...)

    @property
    def is_conv3x3(self) -> bool:
        """Convs with a kernel larger than 1x1 train with conv_dim (LoCon); the rest with network_dim."""
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def collect(root: nn.Module, block_classes: tuple[str, ...], name_of: Callable[[str, str, str], str],
            trains: Callable[[nn.Module], bool] = is_trainable_layer) -> list[Target]:
    """The modules `trains` picks inside `root`'s blocks of `block_classes`, each named
    `name_of(block_path, block_class, child_path)`, first name wins."""
    found: dict[str, Target] = {}
    for block_path, block in root.named_modules():
        cls = type(block).__name__
        if cls not in block_classes:
            continue
        for child_path, child in block.named_modules():
            if not child_path or not trains(child):
                continue
            name = name_of(block_path, cls, child_path)
            found.setdefault(name, Target(name, child, f"{block_path}.{child_path}", block=cls))
    return list(found.values())


def _filter_conv(targets: list[Target], conv: bool) -> list[Target]:
    return [t for t in targets if conv or not t.is_conv3x3]


def ldm_unet_targets(unet: nn.Module, conv: bool = False) -> list[Target]:
    """Targets in an ldm `UNetModel` (SD1/SD2), with sd-scripts' diffusers-style names."""
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())

    def name_of(block_path: str, cls: str, child_path: str) -> str:
        return kohya_name(PREFIX_UNET, ldm_unet_path_to_diffusers(block_path, cls, child_path))

    return _filter_conv(collect(unet, blocks, name_of), conv)


def sdxl_unet_targets(unet: nn.Module, conv: bool = False) -> list[Target]:
    """Targets in an SDXL `UNetModel`: sd-scripts keeps SDXL's own LDM paths as names."""
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
    return _filter_conv(collect(unet, blocks, lambda block_path, cls, child: kohya_name(PREFIX_UNET, f"{block_path}.{child}")), conv)


def hf_clip_targets(text_model: nn.Module, prefix: str) -> list[Target]:
    """Targets in a Hugging Face `CLIPTextModel`; names are its own module paths."""
    return collect(text_model, TEXT_BLOCKS, lambda block_path, cls, child: kohya_name(prefix, f"{block_path}.{child}"))


# OpenCLIP residual block child -> Hugging Face CLIP encoder layer child
_OPENCLIP_MLP = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_ATTN_PARTS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


def openclip_targets(transformer: nn.Module, prefix: str, layers: int | None = None) -> list[Target]:
    """Targets in an OpenCLIP text `Transformer` (`.resblocks`), under sd-scripts' Hugging Face names.

    `layers` limits them to the first N blocks: SD2 reads the penultimate layer, so sd-scripts
    leaves the last block out (23 of 24 layers)."""
    targets = []
    blocks = list(transformer.resblocks)
    for i, block in enumerate(blocks[:layers] if layers is not None else blocks):
        base = f"text_model.encoder.layers.{i}"
        for part, hf in _ATTN_PARTS.items():
            targets.append(Target(kohya_name(prefix, f"{base}.self_attn.{hf}"), block.attn, f"resblocks.{i}.attn", part, "CLIPAttention"))
        for path, hf in _OPENCLIP_MLP.items():
            module = block.get_submodule(path)
            targets.append(Target(kohya_name(prefix, f"{base}.{hf}"), module, f"resblocks.{i}.{path}", block="CLIPMLP"))
    return targets


# LyCORIS' presets (`preset=` in network_args), in the host's block classes: which blocks a preset
# trains, and whether its convs larger than 1x1 are in (LyCORIS' `enable_conv`).
_TRANSFORMER, _CONV_BLOCKS, _TEXT = set(UNET_BLOCKS), set(UNET_CONV_BLOCKS), set(TEXT_BLOCKS) | {"CLIPMLP"}
PRESETS: dict[str, tuple[set[str], bool]] = {
    "full": (_TRANSFORMER | _CONV_BLOCKS | _TEXT, True),
    "full-lin": (_TRANSFORMER | _CONV_BLOCKS | _TEXT, False),
    "attn-mlp": (_TRANSFORMER | _TEXT, False),
    "attn-only": (_TRANSFORMER | {"CLIPAttention", "CLIPSdpaAttention"}, False),  # and of the transformers, attention only
    "unet-transformer-only": (_TRANSFORMER, False),
    "unet-convblock-only": (_CONV_BLOCKS, True),
    "ia3": (_TRANSFORMER | _TEXT, False),  # and of those, only the names below
}
# LyCORIS' ia3 preset: keys and values of attention, and the MLP's output (trained on its input)
IA3_NAMES = ("_to_k", "_to_v", "_ff_net_2", "_k_proj", "_v_proj", "_mlp_fc2")
IA3_ON_INPUT = ("_ff_net_2", "_mlp_fc2")


def preset_targets(targets: list[Target], preset: str) -> list[Target]:
    """The targets LyCORIS' `preset` trains, of `targets` (found with convs). An unknown name is a
    KeyError naming the presets there are."""
    if preset not in PRESETS:
        raise KeyError(preset)
    blocks, conv = PRESETS[preset]
    out = [t for t in targets if t.block in blocks and (conv or not t.is_conv3x3)]
    if preset == "attn-only":
        out = [t for t in out if "_attn1_" in t.name or "_attn2_" in t.name or "_self_attn_" in t.name]
    elif preset == "ia3":
        out = [t for t in out if t.name.endswith(IA3_NAMES)]
    return out
