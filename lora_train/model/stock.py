"""The stock config for a checkpoint that has no .yaml beside it: the family from the file's keys,
and what the keys cannot tell (SD2's eps or v prediction) from `v2` / `v_parameterization`, as
sd-scripts takes them.
"""

from __future__ import annotations

import copy

from lora_train.errors import msg
from lora_train.model.loading import V1_INFERENCE_CONFIG
from lora_train.model.sgm_loading import SDXL_KEY

# a key only SD2 single-file checkpoints have, its OpenCLIP text encoder (the WebUI's
# sd_models_config tells SD2 apart by the same key)
SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"

# stablediffusion's configs/stable-diffusion/v2-inference.yaml (v2-inference-v.yaml adds
# parameterization: v), with use_checkpoint / use_fp16 off: the model is built on the CPU in fp32,
# and the trainer sets its own checkpointing
SD2_INFERENCE_CONFIG = copy.deepcopy(V1_INFERENCE_CONFIG)
SD2_INFERENCE_CONFIG["params"]["unet_config"]["params"] = {
    "use_checkpoint": False, "use_fp16": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
    "transformer_depth": 1, "context_dim": 1024, "legacy": False,
}
SD2_INFERENCE_CONFIG["params"]["cond_stage_config"] = {
    "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
    "params": {"freeze": True, "layer": "penultimate"},  # arch ViT-H-14, ldm's default
}

# family -> the `model:` node of its stock config (eps); a dict so tests can stand a tiny one in
STOCK = {"sd1": V1_INFERENCE_CONFIG, "sd2": SD2_INFERENCE_CONFIG}


def family_of_keys(state: dict) -> str:
    if SDXL_KEY in state:
        return "sdxl"
    return "sd2" if SD2_KEY in state else "sd1"


def stock_config(state: dict, name: str, v2: bool = False, v_parameterization: bool = False) -> tuple[dict, list[str]]:
    """(the `model:` node for an SD1/SD2 file without a yaml, notes). SDXL files go to sgm's own."""
    family = family_of_keys(state)
    notes = []
    if v2 and family != "sd2":
        notes.append(msg("v2 is set, but {name} has no SD2 text encoder (OpenCLIP ViT-H): loaded as {family}, v2 ignored",
                         name=name, family=family.upper()))
    elif not v2 and family == "sd2":
        notes.append(msg("{name} is an SD2 checkpoint (OpenCLIP ViT-H text encoder) although v2 is not set: loaded as SD2",
                         name=name))
    config = copy.deepcopy(STOCK[family])
    if v_parameterization:
        if family == "sd1":
            # sd-scripts trains SD1 with v-prediction when asked; the model then predicts v
            notes.append(msg("v_parameterization is set on the SD1 checkpoint {name}: trained to predict v, as sd-scripts does",
                             name=name))
        config["params"]["parameterization"] = "v"
    return config, notes


def yaml_notes(model_config: dict, name: str, v2: bool, v_parameterization: bool) -> list[str]:
    """The yaml beside a checkpoint says what the model is; flags that contradict it are named."""
    params = model_config.get("params", {})
    notes = []
    is_v = params.get("parameterization", "eps") == "v"
    if v_parameterization and not is_v:
        notes.append(msg("v_parameterization is set, but {name}'s .yaml says eps prediction: the .yaml is followed",
                         name=name))
    cond = str(params.get("cond_stage_config", {}).get("target", ""))
    if v2 and not cond.endswith("FrozenOpenCLIPEmbedder"):
        notes.append(msg("v2 is set, but {name}'s .yaml is not an SD2 model: the .yaml is followed", name=name))
    return notes
