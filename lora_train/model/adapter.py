"""The contract between the trainer and a loaded model it does not own."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_train.errors import UserError, msg
from lora_train.model.caption_tokens import TextOptions
from lora_train.network.targets import Target


@dataclass
class ModelInfo:
    """What the saved file says about its base model (kohya `ss_*` / modelspec vocabulary)."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v"
    resolution: int  # native training resolution
    name: str | None = None  # checkpoint file name
    path: str | None = None
    vae: str | None = None  # the VAE file that replaced the checkpoint's own (`vae`)
    notes: list[str] = field(default_factory=list)

    @property
    def base_model_version(self) -> str:
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        return f"sd_{'v2' if self.family == 'sd2' else 'v1'}{'_v' if self.prediction_type == 'v' else ''}"

    @property
    def modelspec_architecture(self) -> str:
        if self.family == "sdxl":
            return "stable-diffusion-xl-v1-base/lora"
        if self.family == "sd2":
            return "stable-diffusion-v2-768-v/lora" if self.prediction_type == "v" else "stable-diffusion-v2-512/lora"
        return "stable-diffusion-v1/lora"


def posterior(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A VAE encoder's moments (mean and log-variance stacked on the channels) -> (mean, std)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    if not torch.isfinite(mean).all():
        raise UserError(msg("the VAE gave non-finite latents for this image (an fp16 VAE overflow?): use an fp32 or the fp16-fix SDXL VAE"))
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def draw(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None, device) -> torch.Tensor:
    """One draw from the posterior with `generator` (never the global RNG), unscaled, float32 on `device`."""
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
    return mean.float().to(device) + std.float().to(device) * noise.to(device)


class ModelAdapter:
    """Wraps a loaded model. Subclasses provide the model-family specifics."""

    info: ModelInfo
    model: nn.Module
    # Where work happens. Fixed by a host that moves modules on and off the GPU by itself (the
    # WebUI's --medvram): the UNet's parameters are not always there.
    _device: torch.device | None = None
    # no_half_vae: a half-precision VAE encodes in float32 (the WebUI keeps its VAE in fp16 unless
    # started with --no-half-vae; a file loaded here is float32 already)
    vae_fp32: bool = False
    # The host chose the model's attention (the WebUI's cross-attention optimisation): a run keeps it.
    # Elsewhere a run swaps in SDPA (`attention()`).
    host_attention: bool = False

    @property
    def unet(self) -> nn.Module:
        return self.model.model.diffusion_model  # ldm's DiffusionWrapper and sgm's OpenAIWrapper alike

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        return self.info.prediction_type

    @property
    def device(self) -> torch.device:
        return self._device or next(self.unet.parameters()).device

    def modules(self) -> list[nn.Module]:
        """Top-level modules the trainer must freeze and restore."""
        raise NotImplementedError

    @property
    def vae(self) -> nn.Module:
        raise NotImplementedError

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def vae_for_encoding(self, upcast: bool = False):
        """The VAE's dtype for an encode: float32 when `upcast` or `vae_fp32` asks for it and the
        VAE is in half precision, for the call only; its own tensors are put back after, bit for bit."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        if dtype == torch.float32 or not (upcast or self.vae_fp32):
            yield dtype
            return
        saved = [(m, store, name, t) for m in vae.modules() for store in (m._parameters, m._buffers)
                 for name, t in store.items() if t is not None]
        kept = [(t, t.data) for _m, _store, _name, t in saved]
        vae.float()
        try:
            yield torch.float32
        finally:
            for t, data in kept:
                t.data = data
            for _m, store, name, t in saved:
                store[name] = t

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] to UNet latents: encode, then one posterior draw from `generator`."""
        return self.sample_latents(*self.encode_posterior(pixels), generator)

    def encode_captions(self, captions: list[str], options: TextOptions = TextOptions()):
        """The text encoders' output for `captions`: what a text-encoder cache keeps per caption.
        `options`: sd-scripts' max_token_length and weighted_captions (default: 75 tokens, unweighted)."""
        raise NotImplementedError

    def condition(self, text, sizes: torch.Tensor | None):
        """The UNet's conditioning from `encode_captions` output plus, for models that take it
        (SDXL), `sizes`: N x 6 (original height, width; crop top, left; target height, width)."""
        return text

    @staticmethod
    def size_condition(width: int, height: int, n: int = 1) -> torch.Tensor:
        """Sizes for generating a width x height image (nothing cropped)."""
        return torch.tensor([[height, width, 0, 0, height, width]] * n, dtype=torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents to pixels in about [-1, 1]."""
        return self.model.decode_first_stage(latents.to(self.device, next(self.vae.parameters()).dtype)).float()

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        raise NotImplementedError

    def lora_targets(self, conv: bool = False) -> list[Target]:
        raise NotImplementedError

    def file_targets(self) -> list[Target]:
        """Every module a network file may change on this model: the LoRA targets with convs, and the
        UNet's norm layers LyCORIS trains with train_norm."""
        from lora_train.network.norm import ldm_unet_norm_targets, sdxl_unet_norm_targets

        norms = sdxl_unet_norm_targets(self.unet) if self.info.family == "sdxl" else ldm_unet_norm_targets(self.unet)
        return self.lora_targets(conv=True) + norms

    def can_train_text_encoder(self) -> bool:
        return True

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False, generator: torch.Generator | None = None,
                 train_text_encoder: bool = False):
        """Whatever the model needs switched for LoRA training (checkpoint flags), restored after."""
        yield self

    def attention(self, train_text_encoder: bool = False):
        """For a run: PyTorch's SDPA in the model's attention layers (`model/attention.py`; the text
        encoder's only when it trains), restored after; nothing under a host that chose its own."""
        if self.host_attention:
            return contextlib.nullcontext([])
        from lora_train.model.attention import sdpa_attention

        return sdpa_attention(self.modules(), text_encoder=train_text_encoder)

    @contextlib.contextmanager
    def frozen(self):
        """Freeze every host parameter for the duration; restore flags and modes afterwards."""
        saved = []
        for root in self.modules():
            saved.append((root, [(p, p.requires_grad) for p in root.parameters()], [(m, m.training) for m in root.modules()]))
        try:
            for root in self.modules():
                root.requires_grad_(False)
            yield self
        finally:
            for _root, params, modes in saved:
                for p, flag in params:
                    if flag and p.is_inference():  # a weight the host made under inference mode (Forge)
                        with torch.inference_mode():
                            p.requires_grad_(flag)
                    else:
                        p.requires_grad_(flag)
                for m, mode in modes:
                    m.training = mode
