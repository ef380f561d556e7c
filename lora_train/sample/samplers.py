"""Our own samplers over the ModelAdapter contract: DDIM (eta 0) and Euler / Euler ancestral.

Both take the noise schedule and parameterization from the adapter, so the same code serves
eps- and v-prediction models. Every random draw comes from the caller's `torch.Generator`.

Timesteps:
- DDIM uses diffusers' "leading" spacing with `steps_offset=0` and `set_alpha_to_one=True`, which
  is what sd-scripts' preview DDIMScheduler gets: t = (steps-1..0) * (T // steps), and the last
  step lands on alpha 1, i.e. it returns the predicted x0. Unlike sd-scripts we do not clip x0 to
  [-1, 1] (`clip_sample`): that range is meant for pixels, and A1111 does not clip latents either.
- Euler / Euler a use k-diffusion's `DiscreteSchedule.get_sigmas` (what A1111 runs): t evenly
  spaced from T-1 to 0 as floats, sigma interpolated in log space, then a final sigma of 0. The
  UNet gets the float t, as A1111 does with quantization off.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

log = logging.getLogger(__name__)

# our key -> the name A1111 shows (and reads back from PNG Info)
SAMPLER_LABELS = {"ddim": "DDIM", "euler_a": "Euler a", "euler": "Euler"}
_ALIASES = {"k_euler_a": "euler_a", "k_euler": "euler", "euler a": "euler_a", "euler_ancestral": "euler_a"}
DEFAULT_SAMPLER = "ddim"


def resolve_sampler(name: str | None) -> str:
    """Our key for a sampler name. sd-scripts falls back to DDIM for names it does not know; we
    do the same for the ones we do not implement (lms, dpm++, ...) and say so in the log."""
    key = (name or DEFAULT_SAMPLER).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SAMPLER_LABELS:
        log.warning("sampler '%s' is not available here; using DDIM", name)
        return DEFAULT_SAMPLER
    return key


# -- schedules --------------------------------------------------------------------------------
def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    steps = max(1, min(int(steps), num_train_timesteps))
    ratio = num_train_timesteps // steps
    return [i * ratio for i in reversed(range(steps))]


def euler_schedule(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas): `steps` float timesteps and `steps + 1` sigmas ending in 0."""
    ac = alphas_cumprod.double()
    log_sigmas = (((1 - ac) / ac) ** 0.5).log()
    t = torch.linspace(len(ac) - 1, 0, max(1, int(steps)), dtype=torch.float64)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    return t.float(), torch.cat([sigmas, sigmas.new_zeros(1)]).float()


# -- the guided model --------------------------------------------------------------------------
Denoiser = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def guided_eps(adapter, cond, uncond, scale: float) -> Denoiser:
    """eps(x_in, t, alpha_cumprod_t) with classifier-free guidance, whatever the model predicts.

    Guidance is linear, so mixing v outputs and then converting equals converting then mixing.
    """
    v_model = adapter.prediction_type == "v"
    guide = uncond is not None and scale != 1.0
    both = _cat_cond(uncond, cond) if guide else None

    def eps(x_in: torch.Tensor, t: torch.Tensor, a: float) -> torch.Tensor:
        ts = t.to(x_in.device).expand(x_in.shape[0])
        if not guide:
            out = adapter.predict(x_in, ts, cond).float()
        elif both is not None:
            out_u, out_c = adapter.predict(torch.cat([x_in, x_in]), torch.cat([ts, ts]), both).float().chunk(2)
            out = out_u + scale * (out_c - out_u)
        else:
            out_u = adapter.predict(x_in, ts, uncond).float()
            out = out_u + scale * (adapter.predict(x_in, ts, cond).float() - out_u)
        if v_model:
            # x_in = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0
            return math.sqrt(a) * out + math.sqrt(1 - a) * x_in
        return out

    return eps


def _cat_cond(uncond, cond):
    """One batched UNet call for both halves when the cond type allows it (None: call twice)."""
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor) and cond.shape == uncond.shape:
        return torch.cat([uncond, cond])
    if isinstance(cond, dict) and isinstance(uncond, dict) and cond.keys() == uncond.keys():
        if all(isinstance(v, torch.Tensor) and v.shape == uncond[k].shape for k, v in cond.items()):
            return {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    return None


def _noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


# -- samplers ----------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(adapter, eps: Denoiser, shape, steps: int, generator: torch.Generator) -> torch.Tensor:
    ac = adapter.alphas_cumprod.double().cpu()
    timesteps = ddim_timesteps(steps, len(ac))
    ratio = len(ac) // len(timesteps)
    device = adapter.device
    x = _noise(shape, generator, device)
    for t in timesteps:
        a = float(ac[t])
        a_prev = float(ac[t - ratio]) if t - ratio >= 0 else 1.0
        e = eps(x, torch.tensor([t], dtype=torch.long), a)
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e
    return x


@torch.no_grad()
def sample_euler(adapter, eps: Denoiser, shape, steps: int, generator: torch.Generator, eta: float = 1.0) -> torch.Tensor:
    """k-diffusion's `sample_euler_ancestral` (eta 0 is plain Euler), in sigma space: x = x0 + sigma eps."""
    timesteps, sigmas = euler_schedule(adapter.alphas_cumprod.cpu(), steps)
    device = adapter.device
    x = _noise(shape, generator, device) * float(sigmas[0])
    for i, t in enumerate(timesteps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        scale_in = 1.0 / math.sqrt(sigma**2 + 1)  # = sqrt(alpha_cumprod): the UNet's input scale
        e = eps(x * scale_in, t.reshape(1), scale_in**2)
        denoised = x - sigma * e
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)) if eta else 0.0
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + _noise(shape, generator, device) * sigma_up
    return x


def run_sampler(name: str, adapter, eps: Denoiser, shape, steps: int, generator: torch.Generator) -> torch.Tensor:
    key = resolve_sampler(name)
    if key == "ddim":
        return sample_ddim(adapter, eps, shape, steps, generator)
    return sample_euler(adapter, eps, shape, steps, generator, eta=1.0 if key == "euler_a" else 0.0)
