"""ModelAdapter over an ldm `LatentDiffusion` (SD1.x / SD2.x), as the host or our loader built it."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lora_train.model.adapter import ModelAdapter, ModelInfo
from lora_train.model.caption_tokens import TextOptions, Vocab, hf_vocab, join_chunks, openclip_vocab, token_rows, weigh
from lora_train.model.checkpointing import checkpointed, own_checkpoint_flags_off
from lora_train.network.naming import PREFIX_TE
from lora_train.network.targets import Target, hf_clip_targets, ldm_unet_targets, openclip_targets


class LdmAdapter(ModelAdapter):
    def __init__(self, model, name: str | None = None, clip_skip: int = 1, device: torch.device | None = None):
        self.model = model
        self._device = torch.device(device) if device is not None else None
        # The host wraps the text encoder (prompt emphasis, TI); the ldm embedder sits at `.wrapped`.
        self.embedder = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
        self.is_openclip = hasattr(self.embedder, "model") and not hasattr(self.embedder, "transformer")
        self.clip_skip = max(1, int(clip_skip or 1))
        prediction = "v" if getattr(model, "parameterization", "eps") == "v" else "epsilon"
        family = "sd2" if self.is_openclip else "sd1"
        path = getattr(model, "checkpoint_path", None)
        self.info = ModelInfo(
            family=family,
            prediction_type=prediction,
            resolution=768 if prediction == "v" else 512,
            name=name or (path and path.replace("\\", "/").rsplit("/", 1)[-1]),
            path=path,
        )

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        # The host may override alphas_cumprod (fp16 emulation, zero-terminal-SNR); train on the original.
        ac = getattr(self.model, "alphas_cumprod_original", None)
        if ac is None:
            ac = self.model.alphas_cumprod
        return ac.detach().to(torch.float32)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    # -- encoding ---------------------------------------------------------------------------
    @property
    def vae(self) -> nn.Module:
        return self.model.first_stage_model

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixels` in [-1, 1], NCHW -> the VAE posterior's (mean, std), unscaled."""
        with self.vae_for_encoding() as dtype:
            posterior = self.model.encode_first_stage(pixels.to(self.device, dtype))
        return posterior.mean.float(), posterior.std.float()

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from the posterior with `generator` (never the global RNG), scaled for the UNet."""
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        z = mean.float().to(self.device) + std.float().to(self.device) * noise.to(self.device)
        return self.model.get_first_stage_encoding(z).float()

    def vocab(self) -> Vocab:
        return openclip_vocab() if self.is_openclip else hf_vocab(self.embedder.tokenizer)

    def encode_captions(self, captions: list[str], options: TextOptions = TextOptions()) -> torch.Tensor:
        """The text encoder's hidden states for `captions`; `options` sets sd-scripts'
        max_token_length (75-token chunks, each through the encoder and clip_skip on its own) and
        weighted_captions."""
        tokens, weights = token_rows(captions, self.vocab(), options)
        tokens = tokens.to(self.device)
        if self.is_openclip:
            hidden = self.embedder.encode_with_transformer(tokens)
        else:
            text = self.embedder.transformer
            if self.clip_skip == 1:
                hidden = text(input_ids=tokens).last_hidden_state
            else:
                out = text(input_ids=tokens, output_hidden_states=True)
                hidden = text.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        return weigh(join_chunks(hidden, options.chunks), weights, options)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.apply_model(noisy_latents, timesteps, cond)

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False, generator: torch.Generator | None = None,
                 train_text_encoder: bool = False):
        unet = self.unet
        blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks] if gradient_checkpointing else []
        with own_checkpoint_flags_off(self.model), checkpointed(blocks, generator):
            yield self

    # -- LoRA ---------------------------------------------------------------------------------
    def lora_targets(self, conv: bool = False) -> list[Target]:
        if self.is_openclip:
            # the layers after the one SD2 reads (the penultimate) never reach the UNet
            blocks = self.embedder.model.transformer.resblocks
            targets = openclip_targets(self.embedder.model.transformer, PREFIX_TE, len(blocks) - int(getattr(self.embedder, "layer_idx", 0)))
        else:
            targets = hf_clip_targets(self.embedder.transformer, PREFIX_TE)
        return targets + ldm_unet_targets(self.unet, conv)
