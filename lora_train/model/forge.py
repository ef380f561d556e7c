"""ModelAdapter over a model Forge (stable-diffusion-webui-forge) loaded: SD1.x and SDXL.

Nothing here imports Forge: the adapter reads Forge's LoRA-free objects (`forge_objects_original`:
`unet` a UnetPatcher, `clip` a CLIP patcher, `vae` a VAE wrapper) by the names Forge gives them.
- UNet: `unet.model` (KModel) `.diffusion_model`, called directly with a fresh `transformer_options`;
  the noise schedule and prediction type come from `unet.model.predictor`.
- Text: the Hugging Face CLIPTextModels inside Forge's JointTextEncoder (`clip_l`, `clip_g`), called
  as sd-scripts calls them (not through Forge's prompt engine, which adds emphasis and embeddings):
  SD1 `hidden_states[-clip_skip]` + final layer norm; SDXL both encoders' `hidden_states[-2]`, the
  pooled output of encoder 2 through its `text_projection`, and the size vector from the engine's
  `embedder` (Forge's Timestep(256)), in sgm's order.
- VAE: `vae.first_stage_model` (ldm layout), scaled with its own `process_in` / `process_out`.
Before training, the host makes the weights trainable (`model/forge_train.py`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lora_train.errors import UserError, msg
from lora_train.model.adapter import ModelAdapter, ModelInfo, draw, posterior
from lora_train.model.caption_tokens import TextOptions, first_rows, hf_vocab, join_chunks, token_rows, weigh
from lora_train.model.checkpointing import checkpointed, own_checkpoint_flags_off
from lora_train.model.forge_train import out_of_place_blocks
from lora_train.network.naming import PREFIX_TE, PREFIX_TE1, PREFIX_TE2
from lora_train.network.targets import Target, hf_clip_targets, ldm_unet_targets, sdxl_unet_targets

PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}


def forge_family(engine) -> str:
    """"sd1" | "sd2" | "sdxl" | "sdxl_refiner" | "sd3" | "flux" | "chroma" | the engine's class name."""
    name = type(engine).__name__
    known = {"StableDiffusion": "sd1", "StableDiffusion2": "sd2", "StableDiffusionXL": "sdxl",
             "StableDiffusionXLRefiner": "sdxl_refiner", "StableDiffusion3": "sd3", "Flux": "flux", "Chroma": "chroma"}
    if name in known:
        return known[name]
    for flag, family in (("is_sd3", "sd3"), ("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(engine, flag, False):
            return family
    return name


def text_encoders(engine) -> dict[str, nn.Module]:
    encoders = engine.forge_objects_original.clip.cond_stage_model
    return {key: getattr(encoders, key) for key in ("clip_l", "clip_g", "clip_h", "t5xxl") if hasattr(encoders, key)}


class ForgeAdapter(ModelAdapter):
    host_attention = True  # Forge's own attention function stays

    def __init__(self, engine, name: str | None = None, clip_skip: int = 1, device: torch.device | None = None,
                 path: str | None = None):
        family = forge_family(engine)
        if family not in ("sd1", "sdxl"):
            raise UserError(msg("LoRA Train cannot train this Forge model ({kind}): load an SD1.x or SDXL checkpoint.", kind=family))
        objects = engine.forge_objects_original
        self.model = engine
        self.kmodel = objects.unet.model
        self.clip = objects.clip
        self.vae_wrapper = objects.vae
        self._device = torch.device(device) if device is not None else None
        encoders = text_encoders(engine)
        self.te1 = encoders.get("clip_l")
        self.te2 = encoders.get("clip_g") if family == "sdxl" else None
        if self.te1 is None or (family == "sdxl" and self.te2 is None):
            raise UserError(msg("This Forge model lacks the text encoders of {family} (CLIP-L, and OpenCLIP bigG for SDXL).",
                                family=family.upper()))
        self.clip_skip = max(1, int(clip_skip or 1))
        prediction = getattr(self.kmodel.predictor, "prediction_type", None)
        if prediction not in PREDICTIONS:
            raise UserError(msg("This Forge model predicts '{kind}', which LoRA Train cannot train (eps or v only).", kind=prediction))
        self.info = ModelInfo(family=family, prediction_type=PREDICTIONS[prediction],
                              resolution=1024 if family == "sdxl" else 512, name=name, path=path)

    # -- the model's parts ----------------------------------------------------------------------
    @property
    def unet(self) -> nn.Module:
        return self.kmodel.diffusion_model

    @property
    def vae(self) -> nn.Module:
        return self.vae_wrapper.first_stage_model

    @property
    def text_encoder_root(self) -> nn.Module:
        return self.clip.cond_stage_model

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.text_encoder_root, self.vae]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.kmodel.predictor.alphas_cumprod.detach().to(torch.float32).clone()

    @property
    def computation_dtype(self) -> torch.dtype:
        dtype = getattr(self.kmodel, "computation_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.unet.parameters()).dtype

    # -- latents --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae
        with self.vae_for_encoding() as dtype:  # no_half_vae: a half-precision VAE encodes in float32
            moments = vae.encoder(pixels.to(self.device, dtype))
            if getattr(vae, "quant_conv", None) is not None:
                moments = vae.quant_conv(moments)
        return posterior(moments)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.vae.process_in(draw(mean, std, generator, self.device)).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = vae.process_out(latents.to(self.device, torch.float32)).to(next(vae.parameters()).dtype)
        return vae.decode(z).float()

    # -- conditioning ---------------------------------------------------------------------------
    def encode_captions(self, captions: list[str], options: TextOptions = TextOptions()):
        n = options.chunks
        tokenizers = self.clip.tokenizer
        tokens1, weights1 = token_rows(captions, hf_vocab(tokenizers.clip_l), options)
        text1 = self.te1.transformer
        if self.te2 is None:
            out = text1(input_ids=tokens1.to(self.device), output_hidden_states=True)
            hidden = text1.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
            return weigh(join_chunks(hidden, n), weights1, options)
        # SDXL: encoder 2 pads with "!" (id 0) as sd-scripts' tokenizer 2 does
        tokens2, weights2 = token_rows(captions, hf_vocab(tokenizers.clip_g), options)
        h1 = text1(input_ids=tokens1.to(self.device), output_hidden_states=True).hidden_states[-2]
        text2 = self.te2.transformer
        tokens2 = tokens2.to(self.device)
        out2 = text2(input_ids=tokens2, output_hidden_states=True)
        last = out2.last_hidden_state  # after the final layer norm; pooled at the first EOS (the highest id)
        pooled = text2.text_projection(last[torch.arange(last.shape[0], device=last.device), tokens2.argmax(dim=-1)])
        h1 = weigh(join_chunks(h1, n), weights1, options)
        h2 = weigh(join_chunks(out2.hidden_states[-2], n), weights2, options)
        return {"crossattn": torch.cat([h1, h2.to(h1.dtype)], dim=-1), "pooled": first_rows(pooled, n)}

    def condition(self, text, sizes: torch.Tensor | None):
        if self.te2 is None:
            return text
        n = text["crossattn"].shape[0]
        if sizes is None:
            side = self.info.resolution
            sizes = torch.tensor([[side, side, 0, 0, side, side]] * n)
        sizes = sizes.to(self.device, torch.float32)
        # Forge's SDXL engine: Timestep(256) of height, width, crop top, crop left, target height, width
        flat = self.model.embedder(sizes.reshape(-1)).reshape(n, -1)
        pooled = text["pooled"]
        return {"crossattn": text["crossattn"], "vector": torch.cat([pooled, flat.to(pooled.dtype)], dim=-1)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        dtype = self.computation_dtype
        if isinstance(cond, dict):
            context, y = cond["crossattn"], cond["vector"].to(dtype)
        else:
            context, y = cond, None
        return self.unet(noisy_latents.to(dtype), timesteps.float(), context=context.to(dtype), y=y,
                         control=None, transformer_options={})

    # -- training -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False, generator: torch.Generator | None = None,
                 train_text_encoder: bool = False):
        unet = self.unet
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks] if gradient_checkpointing else []
        with own_checkpoint_flags_off(unet), out_of_place_blocks(unet), checkpointed(blocks, generator):
            yield self

    def lora_targets(self, conv: bool = False) -> list[Target]:
        if self.te2 is None:
            return hf_clip_targets(self.te1.transformer, PREFIX_TE) + ldm_unet_targets(self.unet, conv)
        return (hf_clip_targets(self.te1.transformer, PREFIX_TE1) + hf_clip_targets(self.te2.transformer, PREFIX_TE2)
                + sdxl_unet_targets(self.unet, conv))
