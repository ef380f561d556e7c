"""kohya module names.

sd-scripts converts SD1/SD2 checkpoints to a diffusers-layout UNet before it names LoRA modules, so
their UNet names are diffusers paths (`down_blocks_1_attentions_0_...`) although the host runs the
LDM layout (`input_blocks.4.1...`). The inverse of the host's `convert_diffusers_name_to_compvis`.
"""

from __future__ import annotations

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"  # SD1/SD2
PREFIX_TE1, PREFIX_TE2 = "lora_te1", "lora_te2"  # SDXL's two text encoders
PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")

# ldm ResBlock child -> diffusers ResnetBlock2D child
_RESNET_CHILD = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
    "in_layers.0": "norm1",
    "out_layers.0": "norm2",
}

# ldm block class -> its role in the diffusers layout
BLOCK_ROLE = {
    "ResBlock": "resnets",
    "SpatialTransformer": "attentions",
    "Downsample": "downsamplers",
    "Upsample": "upsamplers",
}


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def ldm_unet_path_to_diffusers(block_path: str, block_class: str, child: str) -> str:
    """Map a child module of an ldm UNet block to its diffusers path.

    `block_path` is the block's path in the ldm UNet (`input_blocks.4.1`), `block_class` its class
    name (`SpatialTransformer`), `child` the module path inside the block (`proj_in`).
    """
    role = BLOCK_ROLE.get(block_class)
    if role is None:
        raise ValueError(f"no diffusers name for a {block_class} at {block_path}")
    parts = block_path.split(".")
    if role == "resnets":
        if child not in _RESNET_CHILD:
            raise ValueError(f"no diffusers name for {block_path}.{child}")
        child = _RESNET_CHILD[child]
    elif role in ("downsamplers", "upsamplers"):
        child = "conv"  # ldm Downsample.op / Upsample.conv

    if parts[0] == "input_blocks":
        n = int(parts[1])
        if role == "downsamplers":
            return f"down_blocks.{n // 3 - 1}.downsamplers.0.{child}"
        return f"down_blocks.{(n - 1) // 3}.{role}.{(n - 1) % 3}.{child}"
    if parts[0] == "middle_block":
        k = int(parts[1])
        index = 0 if role == "attentions" else k // 2
        return f"mid_block.{role}.{index}.{child}"
    if parts[0] == "output_blocks":
        n = int(parts[1])
        if role == "upsamplers":
            return f"up_blocks.{n // 3}.upsamplers.0.{child}"
        return f"up_blocks.{n // 3}.{role}.{n % 3}.{child}"
    raise ValueError(f"no diffusers name for {block_path}")
