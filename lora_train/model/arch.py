"""Full-size reference architectures built on the meta device: shapes and names, no memory.

Used to list what a LoRA trains on a real SD1.5 / SD2.1 / SDXL model without loading one.
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

# generative-models' configs/inference/sd_xl_base.yaml, UNet part
SDXL_UNET_PARAMS = dict(
    adm_in_channels=2816,
    num_classes="sequential",
    use_checkpoint=True,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2],
    num_res_blocks=2,
    channel_mult=[1, 2, 4],
    num_head_channels=64,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=[1, 2, 10],
    context_dim=2048,
    legacy=False,
)

ARCHS = ("sd15", "sd21", "sdxl")


def meta_unet(arch: str) -> torch.nn.Module:
    import_ldm()
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if arch == "sdxl":
        return _sdxl_unet_from_ldm(UNetModel)
    params = copy.deepcopy(V1_INFERENCE_CONFIG["params"]["unet_config"]["params"] if arch == "sd15" else SD21_UNET_PARAMS)
    with torch.device("meta"), quiet():
        return UNetModel(**params)


def _sdxl_unet_from_ldm(unet_class, device: str = "meta", **overrides) -> torch.nn.Module:
    """SDXL's UNet from ldm's classes, which sgm's are a later copy of: ldm takes one transformer
    depth for all levels, so build with the deepest and cut each level's blocks to its own depth,
    and add SDXL's `y` input (`label_emb`). Its SpatialTransformers then want the context as a list
    with one entry per block (ldm indexes it so); `ldm_sdxl_context` makes one."""
    params = {k: v for k, v in SDXL_UNET_PARAMS.items() if k not in ("adm_in_channels", "num_classes", "transformer_depth")}
    params.update(overrides)
    depths = SDXL_UNET_PARAMS["transformer_depth"]
    params["context_dim"] = [params["context_dim"]] * max(depths)
    with torch.device(device), quiet():
        unet = unet_class(image_size=32, transformer_depth=max(depths), **params)
        embed = params["model_channels"] * 4
        unet.num_classes = "sequential"
        unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(SDXL_UNET_PARAMS["adm_in_channels"], embed), torch.nn.SiLU(), torch.nn.Linear(embed, embed)))
    channels_to_level = {params["model_channels"] * m: level for level, m in enumerate(params["channel_mult"])}
    for module in unet.modules():
        if type(module).__name__ == "SpatialTransformer":
            width = module.proj_out.out_features
            depth = depths[channels_to_level[width]] if module is not unet.middle_block[1] else depths[-1]
            module.transformer_blocks = torch.nn.ModuleList(list(module.transformer_blocks)[:depth])
    return unet


def ldm_sdxl_context(context: torch.Tensor) -> list[torch.Tensor]:
    return [context] * max(SDXL_UNET_PARAMS["transformer_depth"])


TEXT_CONFIGS = {
    "sd15": clip_files.CLIP_L_TEXT_CONFIG,
    "sd21": clip_files.OPENCLIP_H_TEXT_CONFIG,
    "sdxl-te1": clip_files.CLIP_L_TEXT_CONFIG,
    "sdxl-te2": clip_files.OPENCLIP_BIGG_TEXT_CONFIG,
}


def meta_text_model(arch: str) -> torch.nn.Module:
    """A text encoder in the Hugging Face layout sd-scripts names its LoRA modules by (`arch` is
    sd15, sd21, sdxl-te1 or sdxl-te2)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS[arch]))
