"""Build and load SD1/SD2 models with the host's own `ldm` classes, offline.

A checkpoint is a `.safetensors` (or `.ckpt`) file with a same-named `.yaml` beside it, the way the
WebUI finds configs; without one, a stock config (stock.py). Text-encoder weights come
from the checkpoint, so `from_pretrained` is only asked for a config and a tokenizer (no hub).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from lora_train.errors import UserError, msg
from lora_train.model import clip_files

V1_INFERENCE_CONFIG = {
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085,
        "linear_end": 0.0120,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 64,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215,
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "image_size": 32,
                "in_channels": 4,
                "out_channels": 4,
                "model_channels": 320,
                "attention_resolutions": [4, 2, 1],
                "num_res_blocks": 2,
                "channel_mult": [1, 2, 4, 4],
                "num_heads": 8,
                "use_spatial_transformer": True,
                "transformer_depth": 1,
                "context_dim": 768,
                "use_checkpoint": False,
                "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4,
                "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True,
                    "z_channels": 4,
                    "resolution": 256,
                    "in_channels": 3,
                    "out_ch": 3,
                    "ch": 128,
                    "ch_mult": [1, 2, 4, 4],
                    "num_res_blocks": 2,
                    "attn_resolutions": [],
                    "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    },
}


@contextlib.contextmanager
def quiet():
    """ldm prints its progress on stdout and pytorch_lightning warns about its own deprecations."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # imports inside may add their own "always" filters; muting the display holds regardless
        warnings.showwarning = lambda *args, **kwargs: None
        yield


def import_ldm():
    """Import ldm quietly; say what to install when it is missing."""
    try:
        with quiet():
            import ldm.models.diffusion.ddpm  # noqa: F401
            import ldm.util
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UserError(msg(
            "cannot import the 'ldm' package ({error}). Inside the WebUI it comes with the host; "
            "headless, install it with: pip install --no-deps stable-diffusion-sdkit==2.1.5", error=e
        )) from e
    return ldm


def _resolve_clip_version(version: str | None, base_dir: Path | None) -> str:
    if version in (None, clip_files.HUB_CLIP_L):
        return str(clip_files.clip_l_folder())
    p = Path(version)
    if p.is_dir():
        return str(p)
    if base_dir is not None and (base_dir / p.name).is_dir():  # checkpoint folder moved with its yaml
        return str(base_dir / p.name)
    raise UserError(msg("text encoder folder '{path}' named in the model config does not exist", path=version))


@contextlib.contextmanager
def text_model_from_config_only(enc):
    """Make `CLIPTextModel.from_pretrained(dir)`, as the module `enc` (ldm's or sgm's encoders)
    calls it, build from config.json alone; weights come later from the checkpoint (the host does
    the same during its own loading)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    original = enc.CLIPTextModel.__dict__.get("from_pretrained")

    def from_config(name_or_path, *args, **kwargs):
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(name_or_path))
        model.name_or_path = str(name_or_path)
        return model

    enc.CLIPTextModel.from_pretrained = from_config
    try:
        yield
    finally:
        if original is None:
            del enc.CLIPTextModel.from_pretrained
        else:
            enc.CLIPTextModel.from_pretrained = original


def instantiate(model_config: dict, base_dir: Path | None = None):
    """Instantiate `model_config` (the `model:` node of an ldm yaml) on CPU, offline."""
    import_ldm()
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(model_config)
    cond = cfg.params.get("cond_stage_config")
    if cond is not None and str(cond.get("target", "")).endswith("FrozenCLIPEmbedder"):
        params = cond.get("params") or {}
        params["version"] = _resolve_clip_version(params.get("version"), base_dir)
        params["device"] = "cpu"
        cond["params"] = params
    if cond is not None and str(cond.get("target", "")).endswith("FrozenOpenCLIPEmbedder"):
        params = cond.get("params") or {}
        params["device"] = "cpu"
        cond["params"] = params
        _no_openclip_download()
    import ldm.modules.encoders.modules as enc

    with text_model_from_config_only(enc), quiet():
        model = instantiate_from_config(cfg)
    return model.eval()


def _no_openclip_download(enc=None):
    # FrozenOpenCLIPEmbedder asks open_clip for pretrained="laion2b_s32b_b79k"; weights come from the
    # checkpoint instead, so the architecture alone is enough. `enc`: ldm's or sgm's encoders module.
    if enc is None:
        import ldm.modules.encoders.modules as enc

    create = enc.open_clip.create_model_and_transforms
    if getattr(create, "_lora_train_offline", False):
        return

    def offline(*args, pretrained=None, **kwargs):
        return create(*args, pretrained=None, **kwargs)

    offline._lora_train_offline = True
    enc.open_clip.create_model_and_transforms = offline


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise UserError(msg("{path}: not a readable .safetensors file ({error})", path=path, error=e)) from e
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(msg("{path}: cannot read checkpoint ({error})", path=path, error=e)) from e
    return data.get("state_dict", data)


def load_checkpoint(path: str | os.PathLike, v2: bool = False, v_parameterization: bool = False):
    """Load `path` with its same-named `.yaml` into an ldm model, or an sgm one for SDXL (its yaml
    names sgm classes, or the file has SDXL's keys). Without a yaml, the file's keys choose the stock
    SD1/SD2 config and `v_parameterization` the prediction (see stock.py). What the loader had to
    decide is kept in the model's `load_notes`. A diffusers folder is read as the file it stands for
    (diffusers_folder.py)."""
    from lora_train.model import diffusers_folder

    path = Path(path)
    if diffusers_folder.is_diffusers_folder(path):
        return diffusers_folder.load_folder(path, v2, v_parameterization)
    if not path.is_file():
        raise UserError(msg("model file '{path}' does not exist", path=path))
    yaml_path = path.with_suffix(".yaml")
    model, weights_missing, _ = build_and_load(read_state_dict(path), path, yaml_path if yaml_path.is_file() else None,
                                               v2, v_parameterization)
    if weights_missing:
        raise UserError(msg(
            "{path}: {count} weights the config expects are not in the file (first: {first}); is '{config}' the right config for it?",
            path=path, count=len(weights_missing), first=weights_missing[0], config=yaml_path.name,
        ))
    return model


def build_and_load(state: dict, path: Path, yaml_path: Path | None, v2: bool, v_parameterization: bool):
    """The model `state` (single-file checkpoint keys) is for, from `yaml_path` or the stock config
    its keys choose, with `state` loaded. Returns (model, weights the config expects that `state`
    lacks, keys of `state` the model does not have)."""
    from omegaconf import OmegaConf

    from lora_train.model import sgm_loading, stock

    if yaml_path is not None:
        try:
            model_config = OmegaConf.to_container(OmegaConf.load(yaml_path).model, resolve=True)
        except Exception as e:
            raise UserError(msg("{path}: not a model config with a 'model:' section ({error})", path=yaml_path, error=e)) from e
        notes = stock.yaml_notes(model_config, path.name, v2, v_parameterization)
    elif sgm_loading.has_sdxl_keys(state):
        model_config, notes = sgm_loading.stock_sdxl_config(path), sdxl_notes(path.name, v2, v_parameterization)
    else:
        model_config, notes = stock.stock_config(state, path.name, v2, v_parameterization)
    if sgm_loading.is_sgm_config(model_config):
        model = sgm_loading.instantiate(model_config, base_dir=path.parent)
    else:
        model = instantiate(model_config, base_dir=path.parent)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.checkpoint_path = str(path)
    model.load_notes = notes
    # The stock configs carry a few buffers that older checkpoints lack (e.g. position_ids,
    # the noise schedule); real weights missing means the config does not fit the file.
    return model, [k for k in missing if not _is_optional_buffer(k)], list(unexpected)


def sdxl_notes(name: str, v2: bool, v_parameterization: bool) -> list[str]:
    if v_parameterization:
        raise UserError(msg("v_parameterization is set, but {name} is an SDXL checkpoint: LoRA Train trains SDXL with its own "
                            "eps prediction; remove v_parameterization", name=name))
    return [msg("v2 is set, but {name} is an SDXL checkpoint: v2 ignored", name=name)] if v2 else []


def _is_optional_buffer(key: str) -> bool:
    return key.endswith("position_ids") or key.startswith("denoiser.") or key.split(".")[0] in {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
        "logvar", "model_ema",
    }
