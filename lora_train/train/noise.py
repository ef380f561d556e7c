"""The noise, timesteps and noise schedule a training step uses, with sd-scripts' noise tricks.

Semantics follow sd-scripts (`train_util.get_noise_noisy_latents_and_timesteps`, `get_timesteps`,
`custom_train_functions.apply_noise_offset` / `pyramid_noise_like` /
`fix_noise_scheduler_betas_for_zero_terminal_snr` / `prepare_scheduler_for_custom_training`).
Every random draw comes from the caller's `torch.Generator` (never torch's or Python's global RNG), so a
run is reproducible from its seed and cannot disturb the host's sampling.

Call order in a step, as in sd-scripts: `make_noise`, `sample_timesteps`, `perturb_noise_for_input`;
noise the latents with the perturbed noise, build the target from the clean one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class NoiseOptions:
    """sd-scripts' argument names and defaults. Falsy values (None or 0) switch a trick off, as there."""

    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: Optional[int] = None
    max_timestep: Optional[int] = None
    zero_terminal_snr: bool = False


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    return torch.randn(shape, generator=generator, device=generator.device).to(device=like.device, dtype=like.dtype)


def _rand1(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device))


def make_noise(latents: torch.Tensor, opts: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, then offset noise, then multires noise (sd-scripts' order).

    With every trick off this is exactly `torch.randn(latents.shape, generator=generator)`.
    """
    noise = _randn(latents.shape, generator, latents)
    if opts.noise_offset:
        offset = opts.noise_offset
        if opts.noise_offset_random_strength:
            # One strength for the whole batch, as sd-scripts draws it.
            offset = _rand1(generator) * offset
        noise = _apply_noise_offset(latents, noise, offset, opts.adaptive_noise_scale, generator)
    if opts.multires_noise_iterations:
        noise = _pyramid_noise(noise, opts.multires_noise_iterations, opts.multires_noise_discount, generator)
    return noise


def _apply_noise_offset(latents, noise, offset: float, adaptive_scale: Optional[float], generator) -> torch.Tensor:
    b, c = latents.shape[:2]
    strength: float | torch.Tensor = offset
    if adaptive_scale is not None:
        # Brighter/darker images get a larger offset: |per-channel mean| of the latents, per sample.
        latent_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        strength = (offset + adaptive_scale * latent_mean).clamp(min=0.0)
    return noise + strength * _randn((b, c, 1, 1), generator, latents)


def _pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator) -> torch.Tensor:
    # sd-scripts' pyramid_noise_like. Its quirks are kept because they shape the noise users tuned for:
    # step 0 adds a second full-resolution noise at weight 1 (r**0 == 1), the scale factor r in [2, 4)
    # is drawn each step (sd-scripts uses Python's `random`, we use the generator), it stops once a
    # side reaches 1, and the result is divided by one std over the whole batch, not per sample.
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = _rand1(generator) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = _randn((b, c, hn, wn), generator, noise)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def sample_timesteps(batch: int, opts: NoiseOptions, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """One uniform integer timestep per sample in [min_timestep, max_timestep), on the generator's device.

    Defaults are 0 and `num_timesteps`. min == max gives that fixed timestep (sd-scripts' own behaviour,
    which its validation pass relies on); `validate_options` rejects min > max.
    """
    lo = 0 if opts.min_timestep is None else opts.min_timestep
    hi = num_timesteps if opts.max_timestep is None else opts.max_timestep
    if lo < hi:
        return torch.randint(lo, hi, (batch,), generator=generator, device=generator.device, dtype=torch.long)
    return torch.full((batch,), hi, dtype=torch.long, device=generator.device)


def perturb_noise_for_input(noise: torch.Tensor, opts: NoiseOptions, generator: torch.Generator) -> torch.Tensor:
    """Input perturbation (ip_noise_gamma, arXiv 2301.11706): the noise to noise the latents with.

    Returns a new tensor; `noise` itself is untouched because the loss target must stay the clean noise.
    Returns `noise` unchanged (no draws) when ip_noise_gamma is off.
    """
    if not opts.ip_noise_gamma:
        return noise
    strength = opts.ip_noise_gamma
    if opts.ip_noise_gamma_random_strength:
        strength = _rand1(generator) * strength
    return noise + strength * _randn(noise.shape, generator, noise)


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale the schedule so the last timestep is pure noise (arXiv 2305.08891, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is unchanged.
    sd-scripts does this on the betas and rebuilds alphas_cumprod by cumprod; the result is the same
    schedule (last value exactly 0). Computed in float64, returned in the input dtype.
    """
    s = alphas_cumprod.double().sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * (s0 / (s0 - s_last))
    return (s**2).to(alphas_cumprod.dtype)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio per timestep, (sqrt(a) / sqrt(1 - a))**2, as sd-scripts' `all_snr`."""
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2
