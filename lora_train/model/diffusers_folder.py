"""A diffusers model folder (model_index.json, unet/, vae/, text_encoder/ [, text_encoder_2/],
scheduler/ ...) as the single-file checkpoint it stands for: its weights renamed to ldm's (SD1/SD2)
or sgm's (SDXL) keys, then loaded the way a checkpoint without a .yaml is (loading.build_and_load),
so the family, the stock config and the notes are the same. What diffusers keeps elsewhere,
the prediction (scheduler_config.json's `prediction_type`), is read from the folder.

The key layouts are diffusers' own (its scripts/convert_diffusers_to_original_*.py say the same);
block numbers are worked out from the folder's keys, not fixed to SD's 4 or SDXL's 3 levels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lora_train.errors import UserError, msg

# part -> the prefix its weights have in a single-file checkpoint
SD_TEXT = {"text_encoder": "cond_stage_model."}
SDXL_TEXT = {"text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}

_UNET_FILES = ("diffusion_pytorch_model{variant}.safetensors", "diffusion_pytorch_model{variant}.bin")
_TEXT_FILES = ("model{variant}.safetensors", "pytorch_model{variant}.bin")

# diffusers' top-level UNet layers -> ldm's
_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
# diffusers' ResnetBlock2D children -> ldm's ResBlock ones
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
# HF CLIP encoder layer children -> open_clip's residual block ones (q/k/v are fused apart)
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
# weights of OpenCLIP towers that diffusers leaves out (see _fill_unused)
_LOGIT_SCALE = re.compile(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.model\.logit_scale$")
_SD2_LAYER = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")


def is_diffusers_folder(path: Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def family_of_folder(folder: Path) -> str:
    """"sd1" | "sd2" | "sdxl" from the folder's configs alone (for --dry-run)."""
    folder = Path(folder)
    if "text_encoder_2" in _index(folder):
        return "sdxl"
    return "sd2" if _is_openclip(folder, "text_encoder") else "sd1"


def load_folder(folder: Path, v2: bool = False, v_parameterization: bool = False):
    """The model of a diffusers folder, loaded through the single-file path."""
    from lora_train.model.loading import build_and_load
    from lora_train.model.stock import family_of_keys

    folder = Path(folder)
    state = folder_state_dict(folder)
    family = family_of_keys(state)
    notes = []
    if _predicts_v(folder):
        if family == "sdxl":
            raise UserError(msg("{folder}: scheduler/scheduler_config.json says v_prediction, but LoRA Train trains SDXL with "
                                "its own eps prediction only", folder=folder))
        if not v_parameterization:
            notes.append(msg("{name}: its scheduler says v_prediction, so the model is trained to predict v "
                             "(as v_parameterization would)", name=folder.name))
        v_parameterization = True
    model, missing, unexpected = build_and_load(state, folder, None, v2, v_parameterization)
    missing = _fill_unused(model, state, missing)
    if missing:
        raise UserError(msg("{folder}: not a complete {family} diffusers model; {count} weights are missing (first: {first})",
                            folder=folder, family=family.upper(), count=len(missing), first=missing[0]))
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if unexpected:
        raise UserError(msg("{folder}: a weight this {family} model does not have: {key}", folder=folder,
                            family=family.upper(), key=unexpected[0]))
    model.load_notes = notes + model.load_notes
    return model


def folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights under single-file checkpoint keys."""
    from lora_train.model.vae_file import from_diffusers

    folder = Path(folder)
    index = _index(folder)
    state = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(_read_part(folder, "unet"), folder).items()}
    state.update({"first_stage_model." + k: v for k, v in from_diffusers(_read_part(folder, "vae")).items()})
    parts = SDXL_TEXT if "text_encoder_2" in index else SD_TEXT
    for part, prefix in parts.items():
        weights = _read_part(folder, part)
        if _is_openclip(folder, part):
            state.update({prefix + "model." + k: v for k, v in clip_to_openclip(weights, folder, part).items()})
        else:
            state.update({prefix + "transformer." + k: v for k, v in weights.items()})
    return state


# -- the UNet -----------------------------------------------------------------------------------
def unet_to_ldm(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """diffusers' UNet2DConditionModel keys -> ldm's UNetModel keys."""
    resnets = {int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not resnets:
        raise UserError(msg("{folder}: unet/ has no down_blocks.0.resnets.0 weights: not a diffusers UNet", folder=folder))
    per_level = max(resnets) + 1  # ldm's num_res_blocks; an up level has one more
    up_with_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        new = _unet_key(key, per_level, up_with_attention)
        if new is None:
            raise UserError(msg("{folder}: {part}/ has a weight LoRA Train does not know: {key}", folder=folder, part="unet", key=key))
        out[new] = value
    return out


def _unet_key(key: str, n: int, up_with_attention: set[int]) -> str | None:
    for theirs, ours in _UNET_TOP.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        # ldm counts blocks through the levels: conv_in, n per down level plus its downsampler;
        # n + 1 per up level, the last one carrying the upsampler
        block = f"input_blocks.{1 + level * (n + 1) + j}" if side == "down" else f"output_blocks.{level * (n + 1) + j}"
        return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
        return f"input_blocks.{(int(m.group(1)) + 1) * (n + 1)}.0.op.{m.group(2)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
        level = int(m.group(1))
        return f"output_blocks.{level * (n + 1) + n}.{2 if level in up_with_attention else 1}.conv.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", key):
        return f"middle_block.{2 * int(m.group(1))}.{_resnet(m.group(2))}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)$", key):
        return f"middle_block.1.{m.group(1)}"
    return None


def _resnet(rest: str) -> str:
    child, _, tail = rest.partition(".")
    return f"{_RESNET.get(child, child)}.{tail}"


# -- OpenCLIP text towers ------------------------------------------------------------------------
def clip_to_openclip(state: dict[str, torch.Tensor], folder: Path, part: str) -> dict[str, torch.Tensor]:
    """An HF CLIPTextModel(WithProjection) that diffusers made of an OpenCLIP tower -> open_clip's keys."""
    out, fused = {}, {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":  # an nn.Linear in HF; open_clip multiplies x @ text_projection
            out["text_projection"] = value.t().contiguous()
            continue
        if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", key):
            fused.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        new = _openclip_key(key)
        if new is None:
            raise UserError(msg("{folder}: {part}/ has a weight LoRA Train does not know: {key}", folder=folder, part=part, key=key))
        out[new] = value
    for (layer, kind), qkv in sorted(fused.items()):
        absent = [c for c in "qkv" if c not in qkv]
        if absent:
            raise UserError(msg("{folder}: {part}/ is missing text_model.encoder.layers.{layer}.self_attn.{which}_proj.{kind}",
                                folder=folder, part=part, layer=layer, which=absent[0], kind=kind))
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def _openclip_key(key: str) -> str | None:
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding"}
    if key in fixed:
        return fixed[key]
    if key.startswith("text_model.final_layer_norm."):
        return "ln_final." + key.rsplit(".", 1)[1]
    if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
        child = _OPENCLIP_LAYER.get(m.group(2))
        return None if child is None else f"transformer.resblocks.{m.group(1)}.{child}.{m.group(3)}"
    return None


@torch.no_grad()
def _fill_unused(model, state: dict, missing: list[str]) -> list[str]:
    """SD2's diffusers text encoder stops before OpenCLIP's last layer (SD2 reads the penultimate
    one, and never its projection), and no diffusers folder keeps `logit_scale`. Those weights never
    touch the output: the last layer becomes a copy of the one before, as sd-scripts writes such a
    model as one file; the others keep the values the model was built with. Returns what is still missing."""
    own = model.state_dict()
    sd2_last = max((int(m.group(1)) for k in own if (m := _SD2_LAYER.match(k))), default=None)
    still = []
    for key in missing:
        if _LOGIT_SCALE.match(key) or key == "cond_stage_model.model.text_projection":
            continue
        m = _SD2_LAYER.match(key)
        if m and int(m.group(1)) == sd2_last:
            before = key.replace(f".resblocks.{sd2_last}.", f".resblocks.{sd2_last - 1}.", 1)
            if before in state:
                own[key].copy_(state[before])
                continue
        still.append(key)
    return still


# -- files --------------------------------------------------------------------------------------
def _index(folder: Path) -> dict:
    try:
        data = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(msg("{path}: not a readable model_index.json ({error})", path=folder / "model_index.json", error=e)) from e
    return data if isinstance(data, dict) else {}


def _config(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(msg("{path}: not valid JSON ({error})", path=path, error=e)) from e
    return data if isinstance(data, dict) else {}


def _is_openclip(folder: Path, part: str) -> bool:
    # OpenCLIP towers (SD2's ViT-H, SDXL's bigG) use gelu; OpenAI's CLIP-L quick_gelu
    if part == "text_encoder_2":
        return True
    config = _config(folder, f"{part}/config.json")
    if not config:
        raise UserError(msg("{folder}: a diffusers model without {part}/config.json", folder=folder, part=part))
    return config.get("hidden_act") == "gelu"


def _predicts_v(folder: Path) -> bool:
    return _config(folder, "scheduler/scheduler_config.json").get("prediction_type") == "v_prediction"


def weight_files(part: str) -> tuple[str, ...]:
    """The names a part's weights may have, preferred first (a download takes the first there is)."""
    names = _UNET_FILES if part in ("unet", "vae") else _TEXT_FILES
    return tuple(f"{part}/" + name.format(variant=variant) for variant in ("", ".fp16") for name in names)


def _read_part(folder: Path, part: str) -> dict[str, torch.Tensor]:
    from lora_train.model.loading import read_state_dict

    for name in weight_files(part):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
        shards = folder / f"{name}.index.json"  # large parts are split, their index names the pieces
        if shards.is_file():
            weight_map = _config(folder, f"{name}.index.json").get("weight_map", {})
            state = {}
            for piece in sorted(set(weight_map.values())):
                state.update(read_state_dict(folder / part / piece))
            return state
    raise UserError(msg("{folder}: a diffusers model without {file}", folder=folder, file=weight_files(part)[0]))
