"""Build SDXL (sgm `DiffusionEngine`) models from a checkpoint and its yaml, offline, on CPU."""

from __future__ import annotations

from pathlib import Path

from lora_train.errors import UserError, msg

# a key only SDXL single-file checkpoints have (the host tells SDXL apart by the same kind of key)
SDXL_KEY = "conditioner.embedders.1.model.ln_final.weight"


def is_sgm_config(model_config: dict) -> bool:
    return str(model_config.get("target", "")).startswith("sgm.")


def has_sdxl_keys(state: dict) -> bool:
    return SDXL_KEY in state


def stock_sdxl_config(checkpoint: Path) -> dict:
    """generative-models' own sd_xl_base.yaml, for an SDXL file that has no yaml beside it."""
    from omegaconf import OmegaConf

    from lora_train.model.sgm_import import import_sgm

    sgm = import_sgm()
    yaml = Path(sgm.__file__).resolve().parent.parent / "configs" / "inference" / "sd_xl_base.yaml"
    if not yaml.is_file():
        raise UserError(msg("{name} is an SDXL checkpoint without a '{config}' beside it, and the sgm checkout has no {path}",
                            name=checkpoint.name, config=checkpoint.with_suffix(".yaml").name, path=yaml))
    return OmegaConf.to_container(OmegaConf.load(yaml).model, resolve=True)


def instantiate(model_config: dict, base_dir: Path | None = None):
    """Instantiate an sgm `model:` config without downloads: the CLIP-L tokenizer/config from a local
    folder (or ours for the hub name), the OpenCLIP architecture without pretrained weights; the
    weights come from the checkpoint."""
    from omegaconf import OmegaConf

    from lora_train.model.loading import _no_openclip_download, _resolve_clip_version, quiet, text_model_from_config_only
    from lora_train.model.sgm_import import import_sgm

    import_sgm()
    import sgm.modules.encoders.modules as enc
    from sgm.util import instantiate_from_config

    cfg = OmegaConf.create(model_config)
    embedders = cfg.params.get("conditioner_config", {}).get("params", {}).get("emb_models", [])
    for e in embedders:
        target = str(e.get("target", ""))
        params = e.get("params") or {}
        if target.endswith("FrozenCLIPEmbedder"):
            params["version"] = _resolve_clip_version(params.get("version"), base_dir)
            params["device"] = "cpu"
        elif target.endswith("FrozenOpenCLIPEmbedder2"):
            params["device"] = "cpu"
        e["params"] = params
    _no_openclip_download(enc)
    with text_model_from_config_only(enc), quiet():
        model = instantiate_from_config(cfg)
    return model.eval()
