"""ModelAdapter over an SDXL model: sgm's `DiffusionEngine` as the WebUI (or `--sgm-path`) built it.

Nothing here imports sgm: the adapter reads the loaded model's parts by the names sgm gives them.
- UNet `model.model.diffusion_model`, called through `model.model` (sgm's OpenAIWrapper: the
  host's --medvram hook sits there) with `{"crossattn", "vector"}`.
- `model.conditioner.embedders`: the two text encoders (the host wraps each; sgm's own sits at
  `.wrapped`) and the size embedders, each reading one `input_key` of the batch. We call the text
  models ourselves (as the host's wrappers do): sgm's embedders tokenize onto a fixed device and
  the conditioner runs them under no_grad unless flagged trainable.
- The noise schedule comes from the model (`alphas_cumprod`, which the host sets, else the
  denoiser's sigmas) and the prediction type from its parameterization or denoiser scaling.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lora_train.errors import UserError, msg
from lora_train.model.adapter import ModelAdapter, ModelInfo, draw, posterior
from lora_train.model.caption_tokens import TextOptions, first_rows, hf_vocab, join_chunks, openclip_vocab, token_rows, weigh
from lora_train.model.checkpointing import checkpointed, own_checkpoint_flags_off
from lora_train.network.naming import PREFIX_TE1, PREFIX_TE2
from lora_train.network.targets import Target, hf_clip_targets, openclip_targets, sdxl_unet_targets

# what each size embedder reads, per sample: columns of the adapter's `sizes` (N x 6)
SIZE_KEYS = {"original_size_as_tuple": (0, 2), "crop_coords_top_left": (2, 4), "target_size_as_tuple": (4, 6)}
_MISSING = object()
AESTHETIC_SCORE = 6.0  # the refiner's extra input; the WebUI's default (opts.sdxl_refiner_high_aesthetic_score)


def _inner(embedder: nn.Module) -> nn.Module:
    return getattr(embedder, "wrapped", embedder)


def is_sdxl(model) -> bool:
    return hasattr(model, "conditioner") and hasattr(getattr(model, "model", None), "diffusion_model")


class SgmAdapter(ModelAdapter):
    def __init__(self, model, name: str | None = None, device: torch.device | None = None):
        if not is_sdxl(model):
            raise UserError(msg("not an SDXL model: it has no sgm conditioner"))
        self.model = model
        self._device = torch.device(device) if device is not None else None
        self.te1 = self.te2 = None
        self.size_embedders: list[tuple[nn.Module, str]] = []
        for embedder in model.conditioner.embedders:
            inner = _inner(embedder)
            if hasattr(inner, "transformer") and hasattr(inner, "tokenizer"):
                self.te1 = inner  # sgm FrozenCLIPEmbedder: Hugging Face CLIP-L
            elif hasattr(getattr(inner, "model", None), "transformer"):
                self.te2 = inner  # sgm FrozenOpenCLIPEmbedder2: OpenCLIP bigG, fused attention
            else:
                key = getattr(embedder, "input_key", None) or getattr(inner, "input_key", None)
                if key not in SIZE_KEYS and key != "aesthetic_score":
                    raise UserError(msg("the conditioner of this SDXL model has an input '{key}' that LoRA Train cannot fill", key=key))
                self.size_embedders.append((inner, key))
        if self.te1 is None or self.te2 is None:
            raise UserError(msg("this SDXL model does not have the two text encoders SDXL base has (CLIP-L and OpenCLIP bigG)"))
        path = getattr(model, "checkpoint_path", None) or getattr(model, "sd_checkpoint_info", None) and model.sd_checkpoint_info.filename
        self.info = ModelInfo(
            family="sdxl",
            prediction_type="v" if self._parameterization() == "v" else "epsilon",
            resolution=1024,
            name=name or (path and str(path).replace("\\", "/").rsplit("/", 1)[-1]),
            path=path,
        )

    def _parameterization(self) -> str:
        p = getattr(self.model, "parameterization", None)
        if p:
            return p
        scaling = getattr(getattr(self.model, "denoiser", None), "scaling", None)
        return "v" if type(scaling).__name__ == "VScaling" else "eps"

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        for attr in ("alphas_cumprod_original", "alphas_cumprod"):
            ac = getattr(self.model, attr, None)
            if ac is not None:
                return torch.as_tensor(ac).detach().to(torch.float32)
        sigmas = getattr(getattr(self.model, "denoiser", None), "sigmas", None)
        if sigmas is None:
            raise UserError(msg("this SDXL model has neither alphas_cumprod nor a discrete denoiser to take the noise schedule from"))
        ac = 1.0 / (1.0 + sigmas.detach().float() ** 2)
        return ac if ac[0] > ac[-1] else ac.flip(0)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    # -- latents --------------------------------------------------------------------------------
    @property
    def vae(self) -> nn.Module:
        return self.model.first_stage_model

    @property
    def scale_factor(self) -> float:
        return float(getattr(self.model, "scale_factor", 0.13025))

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixels` in [-1, 1] -> the VAE posterior's (mean, std), unscaled. SDXL's VAE overflows in
        fp16 (NaN latents), so an fp16 VAE encodes in fp32 for the call and goes back exactly."""
        vae = self.vae
        with self.vae_for_encoding(upcast=next(vae.parameters()).dtype == torch.float16) as dtype:
            moments = vae.quant_conv(vae.encoder(pixels.to(self.device, dtype)))
        return posterior(moments)

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return draw(mean, std, generator, self.device) * self.scale_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return vae.decode(latents.to(self.device, next(vae.parameters()).dtype) / self.scale_factor).float()

    # -- conditioning ---------------------------------------------------------------------------
    def _te1_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        te = self.te1
        layer = getattr(te, "layer", "last")
        out = te.transformer(input_ids=tokens, output_hidden_states=layer == "hidden")
        return out.hidden_states[te.layer_idx] if layer == "hidden" else out.last_hidden_state

    def _te2_hidden_and_pooled(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        clip = self.te2.model
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = x.permute(1, 0, 2)  # open_clip 2.20 runs its text transformer sequence-first
        blocks = clip.transformer.resblocks
        penultimate = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x
            x = block(x, attn_mask=clip.attn_mask)
        last = x.permute(1, 0, 2)
        hidden = last if getattr(self.te2, "layer", "penultimate") == "last" else penultimate.permute(1, 0, 2)
        # CLIP pools at the EOS, the highest token id (argmax: its first one, the first chunk's own end)
        pooled = clip.ln_final(last)[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection
        return hidden, pooled

    def encode_captions(self, captions: list[str], options: TextOptions = TextOptions()) -> dict[str, torch.Tensor]:
        """The text part of SDXL's conditioning, which a cache can keep per caption. `options`:
        sd-scripts' max_token_length (75-token chunks; the pooled output is the first chunk's)
        and weighted_captions."""
        n = options.chunks
        tokens1, weights1 = token_rows(captions, hf_vocab(self.te1.tokenizer), options)
        tokens2, weights2 = token_rows(captions, openclip_vocab(), options)
        h1 = self._te1_hidden(tokens1.to(self.device))
        h2, pooled = self._te2_hidden_and_pooled(tokens2.to(self.device))
        h1 = weigh(join_chunks(h1, n), weights1, options)
        h2 = weigh(join_chunks(h2, n), weights2, options)
        return {"crossattn": torch.cat([h1, h2.to(h1.dtype)], dim=-1), "pooled": first_rows(pooled, n)}

    def condition(self, text: dict[str, torch.Tensor], sizes: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Add the size conditioning: `sizes` is N x 6 (original h, w; crop top, left; target h, w)."""
        n = text["crossattn"].shape[0]
        if sizes is None:
            side = self.info.resolution
            sizes = torch.tensor([[side, side, 0, 0, side, side]] * n)
        sizes = sizes.to(self.device, torch.float32)
        vector = [text["pooled"]]
        for embedder, key in self.size_embedders:
            if key == "aesthetic_score":
                value = torch.full((n,), AESTHETIC_SCORE, device=self.device)
            else:
                a, b = SIZE_KEYS[key]
                value = sizes[:, a:b]
            vector.append(embedder(value).to(text["pooled"].dtype))
        return {"crossattn": text["crossattn"], "vector": torch.cat(vector, dim=-1)}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.model(noisy_latents, timesteps, cond)

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False, generator: torch.Generator | None = None,
                 train_text_encoder: bool = False):
        # The WebUI builds SDXL with `use_checkpoint: True`: sgm's own checkpoint would run every
        # block under no_grad and hand gradients only to the block's own parameters, none to a
        # LoRA hooked inside. Off for the run (restored after); ours is non-reentrant.
        unet = self.unet
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks] if gradient_checkpointing else []
        with own_checkpoint_flags_off(self.model), checkpointed(blocks, generator), \
                self._text_encoders_trainable(train_text_encoder):
            yield self

    @contextlib.contextmanager
    def _text_encoders_trainable(self, on: bool):
        """sgm's conditioner runs an embedder under no_grad unless it is flagged trainable (the host
        copies False onto its wrappers). We call the text models ourselves, but anything else that
        goes through the conditioner while text-encoder LoRA trains must see the gradient too."""
        saved = []
        if on:
            for embedder in self.model.conditioner.embedders:
                if _inner(embedder) in (self.te1, self.te2):
                    for obj in {id(embedder): embedder, id(_inner(embedder)): _inner(embedder)}.values():
                        saved.append((obj, obj.__dict__.get("is_trainable", _MISSING)))
                        obj.is_trainable = True
        try:
            yield
        finally:
            for obj, value in saved:
                if value is _MISSING:
                    obj.__dict__.pop("is_trainable", None)
                else:
                    obj.is_trainable = value

    # -- LoRA -----------------------------------------------------------------------------------
    def lora_targets(self, conv: bool = False) -> list[Target]:
        return (hf_clip_targets(self.te1.transformer, PREFIX_TE1)
                + openclip_targets(self.te2.model.transformer, PREFIX_TE2)
                + sdxl_unet_targets(self.unet, conv))
