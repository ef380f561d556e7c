"""The contract between the trainer and a loaded model it does not own."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_train.network.targets import Target


@dataclass
class ModelInfo:
    """What the saved file says about its base model (kohya `ss_*` / modelspec vocabulary)."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v"
    resolution: int  # native training resolution
    name: str | None = None  # checkpoint file name
    path: str | None = None
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


class ModelAdapter:
    """Wraps a loaded model. Subclasses provide the model-family specifics."""

    info: ModelInfo

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def prediction_type(self) -> str:
        return self.info.prediction_type

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

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

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] to UNet latents: encode, then one posterior draw from `generator`."""
        return self.sample_latents(*self.encode_posterior(pixels), generator)

    def encode_captions(self, captions: list[str]):
        raise NotImplementedError

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        raise NotImplementedError

    def lora_targets(self, conv: bool = False) -> list[Target]:
        raise NotImplementedError

    def can_train_text_encoder(self) -> bool:
        return True

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False, generator: torch.Generator | None = None):
        """Whatever the model needs switched for LoRA training (checkpoint flags), restored after."""
        yield self

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
                    p.requires_grad_(flag)
                for m, mode in modes:
                    m.training = mode
