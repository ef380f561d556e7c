"""`vae`: an external VAE file in place of the checkpoint's own, as sd-scripts and the WebUI take it.

The file holds ldm's AutoencoderKL keys (`encoder.down.0.block.0...`), maybe under the checkpoint's
`first_stage_model.` prefix, or diffusers' (`encoder.down_blocks.0.resnets.0...`), which are renamed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lora_train.errors import UserError, msg

_SKIPPED = ("loss.", "model_ema.")  # training leftovers in some VAE files, no part of the model


def load_vae(model, spec: str) -> list[str]:
    """Replace the weights of `model.first_stage_model` with those of the file `spec` (a path or a
    Hugging Face id). Returns the note saying so."""
    from lora_train.model import hub
    from lora_train.model.loading import read_state_dict

    path = hub.fetch(spec, "vae") if hub.is_hub_id(spec) else _in_folder(Path(spec).expanduser())
    if not path.is_file():
        raise UserError(msg("vae: the file '{path}' does not exist", path=spec))
    state = vae_state_dict(read_state_dict(path))
    vae = model.first_stage_model
    own = vae.state_dict()
    missing = sorted(set(own) - set(state))
    if missing or not state:
        raise UserError(msg("vae '{path}': not a VAE of this model ({count} of its weights missing, first: {first})",
                            path=spec, count=len(missing) or len(own), first=(missing or sorted(own))[0]))
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise UserError(msg("vae '{path}': its {key} is {got}, this model's VAE has {want}: a VAE of another model family?",
                            path=spec, key=wrong[0], got=tuple(state[wrong[0]].shape), want=tuple(own[wrong[0]].shape)))
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])
    model.vae_file = str(path)
    return [msg("vae: latents are encoded with {name} instead of the checkpoint's own VAE", name=path.name)]


def _in_folder(path: Path) -> Path:
    """A diffusers VAE folder (or a diffusers model's vae/ folder): its weights file."""
    for folder in (path, path / "vae"):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (folder / name).is_file():
                return folder / name
    return path


def vae_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ldm-named VAE weights from a VAE file or a whole checkpoint, in either naming."""
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    state = {k: v for k, v in state.items() if not k.startswith(_SKIPPED)}
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state):
        state = from_diffusers(state)
    return state


def from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL names to ldm's; its attention's linear layers become 1x1 convs."""
    ups = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    last_up = max(ups, default=0)
    out = {}
    for key, value in state.items():
        new = key
        # diffusers numbers the decoder's blocks from the bottom, ldm from the top
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{last_up - int(m.group(1))}.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", new)
        new = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", new)
        new = new.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
        new = new.replace(".conv_shortcut.", ".nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        new = new.replace(".mid_block.block.0.", ".mid.block_1.").replace(".mid_block.block.1.", ".mid.block_2.")
        attention = re.match(r"(.*)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)$", new)
        if attention:
            prefix, layer, kind = attention.groups()
            layer = _ATTENTION.get(layer)
            if layer is None:
                raise UserError(msg("vae: unknown diffusers attention weight {key}", key=key))
            new = f"{prefix}.mid.attn_1.{layer}.{kind}"
            if kind == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


# diffusers' mid-block attention (old and new names) -> ldm's AttnBlock
_ATTENTION = {"group_norm": "norm", "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
              "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
