"""Full-size reference architectures built on the meta device: shapes and names, no memory.

Used to list what a LoRA trains on a real SD1.5 / SD2.1 model without loading one.
"""

from __future__ import annotations

import copy

import torch

from lora_train.model import clip_files
from lora_train.model.loading import V1_INFERENCE_CONFIG, import_ldm, quiet

SD21_UNET_PARAMS = dict(
    V1_INFERENCE_CONFIG["params"]["unet_config"]["params"],
    num_head_channels=64,
    use_linear_in_transformer=True,
    context_dim=1024,
)
SD21_UNET_PARAMS.pop("num_heads")

ARCHS = ("sd15", "sd21")


def meta_unet(arch: str) -> torch.nn.Module:
    import_ldm()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = copy.deepcopy(V1_INFERENCE_CONFIG["params"]["unet_config"]["params"] if arch == "sd15" else SD21_UNET_PARAMS)
    with torch.device("meta"), quiet():
        return UNetModel(**params)


def meta_text_model(arch: str) -> torch.nn.Module:
    """The text encoder in the Hugging Face layout sd-scripts names its LoRA modules by."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**(clip_files.CLIP_L_TEXT_CONFIG if arch == "sd15" else clip_files.OPENCLIP_H_TEXT_CONFIG))
    with torch.device("meta"):
        return CLIPTextModel(config)
