"""DDPM forward noising and the regression target, from the model's own noise schedule."""

from __future__ import annotations

import torch


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(a) * x0 + sqrt(1 - a) * noise, `alphas_t` = alphas_cumprod[t] per sample."""
    a = alphas_t.view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def target(latents: torch.Tensor, noise: torch.Tensor, alphas_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps models predict the noise; v models predict v = sqrt(a) * noise - sqrt(1 - a) * x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v":
        a = alphas_t.view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def per_sample_mse(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), tgt.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
