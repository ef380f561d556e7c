"""The built-in tiny model (`builtin:tiny`): an SD1-shaped LatentDiffusion from the real `ldm` classes.

SD1.5's block topology is kept and only widths shrink, because the host's kohya-to-LDM key
converter hard-codes that layout. Random weights, deterministic for a seed; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from lora_train.model import clip_files
from lora_train.model.loading import V1_INFERENCE_CONFIG, instantiate

TINY_TEXT_CONFIG = dict(
    clip_files.CLIP_L_TEXT_CONFIG,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=64,
)


def tiny_model_config(clip_version: str | None = None) -> dict:
    cfg = copy.deepcopy(V1_INFERENCE_CONFIG)
    p = cfg["params"]
    p["image_size"] = 8
    p["unet_config"]["params"].update(
        model_channels=32,  # GroupNorm(32) needs a multiple of 32
        channel_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attention_resolutions=[4, 2, 1],
        num_heads=4,
        context_dim=TINY_TEXT_CONFIG["hidden_size"],
        image_size=8,
    )
    p["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, resolution=64)
    p["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"version": clip_version or str(tiny_clip_folder())},
    }
    return cfg


def tiny_clip_folder() -> Path:
    return clip_files.write_clip_folder(clip_files.cache_dir() / "tiny-clip", TINY_TEXT_CONFIG)


def build_tiny(seed: int = 0):
    """A fresh tiny model. Same seed, same weights."""
    return seeded_build(lambda: instantiate(tiny_model_config()), seed, lambda m: [m.cond_stage_model])


def seeded_build(build, seed: int, text_roots):
    """`build()` under `seed` (the global RNG is put back after), then `make_weights_visible`."""
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build()
        make_weights_visible(model, seed, text_roots(model))
    finally:
        torch.random.set_rng_state(saved)
    model.checkpoint_path = None
    return model


@torch.no_grad()
def make_weights_visible(model, seed: int, text_roots=None) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    unet = model.model.diffusion_model
    # ldm zero-initialises these; a LoRA there would change nothing and tests could not see it.
    for name, module in unet.named_modules():
        if name.endswith("proj_out") or name.endswith("out_layers.3") or name == "out.2":
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # The host divides by the mean of a text encoder's output (prompt emphasis); a fresh
    # LayerNorm (weight 1, bias 0) gives a mean near 0 and NaNs there.
    for root in text_roots if text_roots is not None else [model.cond_stage_model]:
        for module in root.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.5 + 0.1 * torch.randn(module.bias.shape, generator=g))
        projection = getattr(getattr(root, "model", None), "text_projection", None)
        if projection is not None:  # OpenCLIP's pooled output (SDXL's vector), left empty at init
            projection.copy_(torch.randn(projection.shape, generator=g) / projection.shape[0] ** 0.5)


def save_checkpoint(model, path: str | os.PathLike, config_for=None) -> Path:
    """Write `NAME.safetensors`, `NAME.yaml` and the text encoder's tokenizer folder `NAME.clip/`,
    the layout the WebUI loads (the yaml names the folder by absolute path). `config_for(clip_dir)`
    gives the yaml's `model:` node (default: the tiny SD1 config)."""
    import safetensors.torch
    from omegaconf import OmegaConf

    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    clip_dir = clip_files.write_clip_folder(path.with_suffix(".clip"), TINY_TEXT_CONFIG)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(state, str(tmp))
    os.replace(tmp, path)
    yaml_text = OmegaConf.to_yaml(OmegaConf.create({"model": (config_for or tiny_model_config)(str(clip_dir.resolve()))}))
    path.with_suffix(".yaml").write_text(yaml_text, encoding="utf-8")
    return path


def tiny_sd2_config(clip_version: str | None = None) -> dict:
    """The tiny model with SD2's parts: OpenCLIP text encoder (its smallest bundled tower), read at
    the penultimate layer, and linear projections in the transformers. eps; set
    params.parameterization = "v" for an SD2-v model."""
    from lora_train.model.tiny_sdxl import TE2_WIDTH, TINY_OPENCLIP

    cfg = tiny_model_config()
    cfg["params"]["unet_config"]["params"].update(context_dim=TE2_WIDTH, use_linear_in_transformer=True)
    cfg["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                          "params": {"arch": TINY_OPENCLIP, "version": None, "layer": "penultimate"}}
    return cfg
