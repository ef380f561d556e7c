"""A tiny SDXL-architecture model, random weights, for tests, the bench and a host check.

Two builds of the same shapes:
- `build_tiny_sdxl(sgm=True)`: a real sgm `DiffusionEngine` from a tiny version of
  `sd_xl_base.yaml` (needs sgm importable: see `model/sgm_import.py`). `save_tiny_sdxl` writes it as
  a single-file checkpoint with a same-named yaml, the way the WebUI loads SDXL.
- `build_tiny_sdxl(sgm=False)`: the same shapes from the host's `ldm` classes, which sgm's are a
  later copy of, for machines without sgm (CI): ldm's UNet with SDXL's `y` input and sgm-style
  checkpointing on, HF CLIP and OpenCLIP text encoders, and a conditioner and wrapper
  that keep sgm's attribute names (`conditioner.embedders`, `model.diffusion_model`).
Both keep `use_checkpoint: True` as the stock config has it: the trap the adapter must disarm.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from lora_train.model import clip_files
from lora_train.model.arch import SDXL_UNET_PARAMS
from lora_train.model.loading import quiet, text_model_from_config_only
from lora_train.model.tiny import TINY_TEXT_CONFIG, save_checkpoint, seeded_build

# OpenCLIP's smallest bundled text tower (width 256, 10 layers): a name the WebUI can build too
TINY_OPENCLIP = "ViT-S-32-alt"
TE2_WIDTH, TE2_EMBED = 256, 256
SIZE_OUTDIM = 256  # per number, as SDXL base
TE1_LAYER_IDX = TINY_TEXT_CONFIG["num_hidden_layers"] - 1  # SDXL reads CLIP-L's penultimate layer
CONTEXT_DIM = TINY_TEXT_CONFIG["hidden_size"] + TE2_WIDTH
ADM_IN = TE2_EMBED + 3 * 2 * SIZE_OUTDIM
SCALE_FACTOR = 0.13025

UNET_PARAMS = dict(
    SDXL_UNET_PARAMS,
    adm_in_channels=ADM_IN,
    model_channels=32,  # GroupNorm(32) needs a multiple of 32
    num_head_channels=16,
    # SDXL has [1, 2, 10]; ldm's SpatialTransformer only takes one context tensor at depth 1
    transformer_depth=[1, 1, 1],
    context_dim=CONTEXT_DIM,
)
VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_clip_folder() -> Path:
    return clip_files.write_clip_folder(clip_files.cache_dir() / "tiny-clip", TINY_TEXT_CONFIG)


# -- the sgm build --------------------------------------------------------------------------------
def tiny_sdxl_config(clip_version: str | None = None) -> dict:
    """The `model:` node of a tiny sd_xl_base.yaml."""
    size = lambda key: {"is_trainable": False, "input_key": key,  # noqa: E731
                        "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": SIZE_OUTDIM}}
    return {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "scale_factor": SCALE_FACTOR,
            "disable_first_stage_autocast": True,
            "denoiser_config": {
                "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {
                    "num_idx": 1000,
                    "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
                    "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
                    "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
                },
            },
            "network_config": {
                "target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": dict(copy.deepcopy(UNET_PARAMS), spatial_transformer_attn_type="softmax"),
            },
            "conditioner_config": {
                "target": "sgm.modules.GeneralConditioner",
                "params": {"emb_models": [
                    {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                     "params": {"layer": "hidden", "layer_idx": TE1_LAYER_IDX, "version": clip_version or str(tiny_clip_folder())}},
                    {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                     "params": {"arch": TINY_OPENCLIP, "version": None, "freeze": True, "layer": "penultimate",
                                "always_return_pooled": True, "legacy": False}},
                    size("original_size_as_tuple"), size("crop_coords_top_left"), size("target_size_as_tuple"),
                ]},
            },
            "first_stage_config": {
                "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": dict(VAE_DDCONFIG, attn_type="vanilla"),
                           "lossconfig": {"target": "torch.nn.Identity"}},
            },
        },
    }


def _build_sgm(config: dict):
    from lora_train.model import sgm_loading

    return sgm_loading.instantiate(config)


# -- the ldm build --------------------------------------------------------------------------------
class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND: each number of the input embedded sinusoidally, concatenated."""

    is_trainable = False

    def __init__(self, input_key: str, outdim: int = SIZE_OUTDIM):
        super().__init__()
        self.input_key, self.outdim = input_key, outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        if x.ndim == 1:
            x = x[:, None]
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(x.shape[0], -1)


class _Conditioner(nn.Module):
    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class _UNetWrapper(nn.Module):
    """sgm's OpenAIWrapper."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c, **kwargs):
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class SdxlShapedModel(nn.Module):
    """An sgm DiffusionEngine's parts, under its attribute names, from the ldm classes."""

    parameterization = "eps"

    def __init__(self, unet: nn.Module, embedders: list[nn.Module], vae: nn.Module):
        super().__init__()
        self.model = _UNetWrapper(unet)
        self.conditioner = _Conditioner(embedders)
        self.first_stage_model = vae
        self.scale_factor = SCALE_FACTOR
        betas = torch.linspace(0.00085 ** 0.5, 0.0120 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0).float())


def _build_ldm():
    from lora_train.model.loading import _no_openclip_download, import_ldm

    import_ldm()
    import ldm.modules.encoders.modules as enc
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    p = {k: v for k, v in UNET_PARAMS.items() if k not in ("adm_in_channels", "num_classes", "transformer_depth")}
    with quiet():
        unet = UNetModel(image_size=8, transformer_depth=1, **p)
        embed = p["model_channels"] * 4
        unet.num_classes = "sequential"
        unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(ADM_IN, embed), nn.SiLU(), nn.Linear(embed, embed)))
        with text_model_from_config_only(enc):
            te1 = enc.FrozenCLIPEmbedder(version=str(tiny_clip_folder()), device="cpu")
        te1.layer, te1.layer_idx = "hidden", TE1_LAYER_IDX
        _no_openclip_download()
        te2 = enc.FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, version=None, device="cpu", layer="penultimate")
        for e in (te1, te2):
            e.input_key, e.is_trainable = "txt", False
        sizes = [SizeEmbedder(k) for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    return SdxlShapedModel(unet, [te1, te2, *sizes], vae).eval()


# -- both ------------------------------------------------------------------------------------------
def build_tiny_sdxl(seed: int = 0, sgm: bool = True):
    """A fresh tiny SDXL model; same seed, same weights. `sgm=False` builds it from ldm classes."""
    return seeded_build(lambda: _build_sgm(tiny_sdxl_config()) if sgm else _build_ldm(), seed,
                        lambda m: list(m.conditioner.embedders))


def save_tiny_sdxl(model, path: str | os.PathLike) -> Path:
    """`NAME.safetensors` + `NAME.yaml` (+ the CLIP-L tokenizer folder `NAME.clip/`) of an sgm build,
    keys as a real SDXL single-file checkpoint has them."""
    return save_checkpoint(model, path, tiny_sdxl_config)
