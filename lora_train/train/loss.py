"""DDPM forward noising, the regression target, and the per-sample loss with sd-scripts' weightings.

Semantics follow sd-scripts (`train_util.conditional_loss` / `get_huber_threshold_if_needed`,
`custom_train_functions.apply_snr_weight` / `scale_v_prediction_loss_like_noise_prediction` /
`add_v_prediction_like_loss` / `apply_debiased_estimation`, `train_network.py::process_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lora_train.errors import UserError, close_match_hint, msg
from lora_train.train.noise import NoiseOptions, snr

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
PREDICTION_TYPES = ("epsilon", "v")

# sd-scripts caps the SNR here so t=0 (SNR ~1175 on the SD schedule, inf on some) cannot dominate.
# min-SNR weighting does not cap; that is sd-scripts' behaviour too.
SNR_CAP = 1000.0


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


@dataclass
class LossOptions:
    """sd-scripts' argument names and defaults. Falsy gamma / v_pred_like_loss switch them off, as there."""

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: Optional[float] = None
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, opts: LossOptions) -> Optional[torch.Tensor]:
    """Per-sample Huber threshold c(t) for huber / smooth_l1, None for the other loss types.

    exponential: huber_scale * huber_c ** (t / T), from huber_scale at t=0 down to huber_scale * huber_c.
    snr: (1 - huber_c) / (1 + sigma_t)**2 + huber_c with sigma_t = sqrt((1 - a_t) / a_t); sd-scripts
    ignores huber_scale in this schedule and so do we. constant: huber_c * huber_scale.
    """
    if opts.loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.to(alphas_cumprod.device)
    if opts.huber_schedule == "exponential":
        rate = -math.log(opts.huber_c) / alphas_cumprod.shape[0]
        return torch.exp(-rate * t.float()) * opts.huber_scale
    if opts.huber_schedule == "snr":
        a = alphas_cumprod[t].float()
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1 - opts.huber_c) / (1 + sigmas) ** 2 + opts.huber_c
    if opts.huber_schedule == "constant":
        return torch.full(t.shape, opts.huber_c * opts.huber_scale, device=t.device)
    raise ValueError(f"unknown huber_schedule {opts.huber_schedule!r}")


def elementwise_loss(pred: torch.Tensor, tgt: torch.Tensor, loss_type: str, huber_c: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unreduced loss. `huber_c` holds one threshold per sample (huber / smooth_l1 only).

    Both Huber variants are the pseudo-Huber form sd-scripts uses: smooth_l1 = 2 (sqrt(d^2 + c^2) - c),
    huber = c * smooth_l1, so huber is ~d^2 for |d| << c and ~2c|d| beyond.
    """
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, tgt, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, tgt, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs a per-sample huber_c")
        c = huber_c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.dim() - 1)))
        smooth = 2 * (torch.sqrt((pred - tgt) ** 2 + c**2) - c)
        return c * smooth if loss_type == "huber" else smooth
    raise ValueError(f"unknown loss_type {loss_type!r}")


def snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str, opts: LossOptions) -> torch.Tensor:
    """Per-sample loss multipliers from the SNR at each timestep, in sd-scripts' order.

    min-SNR: min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v). v-pred scaling: s = SNR / (SNR + 1).
    v-pred-like loss: loss + loss / s * v_pred_like_loss. debiased: 1 / sqrt(SNR) (eps) or 1 / (SNR + 1) (v).
    s and debiased use SNR capped at 1000; min-SNR does not. All of these are multiplicative, so their
    product is returned.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    v = prediction_type == "v"
    s = snr(alphas_cumprod.float())[timesteps.to(alphas_cumprod.device)]
    capped = torch.clamp(s, max=SNR_CAP)
    weight = torch.ones_like(s)
    if opts.min_snr_gamma:
        weight = weight * torch.clamp(s, max=opts.min_snr_gamma) / (s + 1 if v else s)
    if opts.scale_v_pred_loss_like_noise_pred:
        weight = weight * capped / (capped + 1)
    if opts.v_pred_like_loss:
        weight = weight * (1 + opts.v_pred_like_loss * (capped + 1) / capped)
    if opts.debiased_estimation_loss:
        weight = weight * (1 / (capped + 1) if v else 1 / capped.sqrt())
    return weight


def per_sample_loss(
    pred: torch.Tensor,
    tgt: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    opts: LossOptions,
    *,
    snr_alphas_cumprod: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Loss per sample, shape [N]: elementwise loss in float32, mean over C,H,W, times the SNR weights.

    The caller applies prior_loss_weight and the batch mean (multiplicative, so the order is free).
    `alphas_cumprod` is the schedule the latents were noised with (the Huber 'snr' schedule reads it).
    `snr_alphas_cumprod` is the one the SNR weights read, default the same. sd-scripts computes its SNR
    table before the zero-terminal-SNR fix, so its weights keep the original schedule's SNR; pass the
    unfixed schedule here to match it (and to avoid SNR = 0 at the last timestep, where the eps min-SNR
    and debiased weights are 0/0 and 1/0).
    """
    pred, tgt = pred.float(), tgt.float()
    loss = elementwise_loss(pred, tgt, opts.loss_type, huber_threshold(timesteps, alphas_cumprod, opts))
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    schedule = alphas_cumprod if snr_alphas_cumprod is None else snr_alphas_cumprod
    return loss * snr_weights(timesteps, schedule, prediction_type, opts).to(loss.device)


def validate_options(
    loss_opts: LossOptions,
    noise_opts: Optional[NoiseOptions] = None,
    prediction_type: Optional[str] = None,
    num_timesteps: int = 1000,
) -> list[str]:
    """Raise UserError for settings sd-scripts rejects or that cannot train; return warnings to show.

    `prediction_type` ('epsilon' | 'v') enables the checks that depend on the model.
    """
    o = loss_opts
    if o.loss_type not in LOSS_TYPES:
        raise UserError(msg("loss_type '{value}' is not one of {known}{hint}", value=o.loss_type, known=", ".join(LOSS_TYPES),
                            hint=close_match_hint(o.loss_type, LOSS_TYPES)))
    if o.huber_schedule not in HUBER_SCHEDULES:
        hint = close_match_hint(o.huber_schedule, HUBER_SCHEDULES)
        raise UserError(msg("huber_schedule '{value}' is not one of {known}{hint}", value=o.huber_schedule,
                            known=", ".join(HUBER_SCHEDULES), hint=hint))
    if o.loss_type in ("huber", "smooth_l1"):
        # sd-scripts does not check these; c <= 0 crashes its exponential schedule (log) or zeroes the loss.
        if not o.huber_c > 0:
            raise UserError(msg("huber_c must be greater than 0 (got {value})", value=o.huber_c))
        if not o.huber_scale > 0:
            raise UserError(msg("huber_scale must be greater than 0 (got {value})", value=o.huber_scale))
    if o.min_snr_gamma is not None and o.min_snr_gamma < 0:
        raise UserError(msg("min_snr_gamma must be positive, 5 is the paper's value (got {value})", value=o.min_snr_gamma))
    if prediction_type is not None:
        if o.scale_v_pred_loss_like_noise_pred and prediction_type != "v":
            raise UserError(msg("scale_v_pred_loss_like_noise_pred only applies to v-prediction models (v_parameterization)"))
        if o.v_pred_like_loss and prediction_type == "v":
            raise UserError(msg("v_pred_like_loss cannot be used with a v-prediction model (v_parameterization)"))

    warnings: list[str] = []
    n = noise_opts
    if n is None:
        return warnings
    if n.adaptive_noise_scale is not None and n.noise_offset is None:
        raise UserError(msg("adaptive_noise_scale requires noise_offset (it is added to noise_offset)"))
    if n.multires_noise_iterations is not None and n.multires_noise_iterations < 0:
        raise UserError(msg("multires_noise_iterations must be 0 or more (got {value})", value=n.multires_noise_iterations))
    if n.min_timestep is not None and not 0 <= n.min_timestep < num_timesteps:
        raise UserError(msg("min_timestep must be between 0 and {high} (got {value})", high=num_timesteps - 1, value=n.min_timestep))
    if n.max_timestep is not None and not 1 <= n.max_timestep <= num_timesteps:
        raise UserError(msg("max_timestep must be between 1 and {high} (got {value})", high=num_timesteps, value=n.max_timestep))
    lo = 0 if n.min_timestep is None else n.min_timestep
    hi = num_timesteps if n.max_timestep is None else n.max_timestep
    if lo > hi:
        raise UserError(msg("min_timestep ({low}) must not be greater than max_timestep ({high}); equal values train one fixed timestep",
                            low=lo, high=hi))
    if n.zero_terminal_snr and prediction_type == "epsilon":
        warnings.append(msg("zero_terminal_snr is meant for v-prediction models; with an epsilon model training will be unexpected"))
    return warnings
