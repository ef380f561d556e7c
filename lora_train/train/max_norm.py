"""sd-scripts' `scale_weight_norms`: max-norm regularisation of LoRA modules, after each optimizer step.

For every module, the norm of its weight change (up @ down * alpha / rank, the multiplier left out, as
sd-scripts' `apply_max_norm_regularization` computes it) is capped at the limit: a module above it has
both factors scaled by sqrt(limit / norm), so their product shrinks by limit / norm. The statistics
are the norms after scaling, as sd-scripts logs them (`max_norm/keys_scaled`, `norm/avg_key_norm`,
`max_norm/max_key_norm`).

Only LoRA / LoCon modules (a product of two factors) are scaled: the change of LoHa, LoKr, ... is no
such product, and sd-scripts' own networks.lora is the only network it scales too.
"""

from __future__ import annotations

import torch

from lora_train.errors import UserError, msg
from lora_train.network.dylora import DyLoRA
from lora_train.network.lora import LoRA

# the names sd-scripts logs them under (its TensorBoard / wandb keys)
KEYS_SCALED, AVERAGE_KEY_NORM, MAX_KEY_NORM = "max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm"


def check(network, limit: float | None) -> None:
    """Refuse a limit that is not positive, or a network with modules it cannot scale."""
    if not limit:
        return
    if limit < 0:
        raise UserError(msg("scale_weight_norms must be a positive number (sd-scripts suggests 1), got {value}", value=limit))
    for name, module in network.lora_modules.items():
        if not _scalable(module):
            what = f"DoRA/{module.algorithm}" if module.dora_scale is not None else module.algorithm
            raise UserError(msg("scale_weight_norms scales LoRA and LoCon modules (two factors, up and down) and {name} is {algorithm}; "
                                "remove scale_weight_norms or train a LoRA", name=name, algorithm=what))


def _scalable(module) -> bool:
    return isinstance(module, LoRA) and not isinstance(module, DyLoRA) and module.dora_scale is None


@torch.no_grad()
def apply(network, limit: float) -> dict[str, torch.Tensor]:
    """Scale the modules above `limit`; the statistics stay on the device (read them back when the loss is)."""
    norms, scaled = [], []
    for module in network.lora_modules.values():
        norm = module.weight_delta().float().norm()
        # above the limit, ratio = limit / norm; at or below it, exactly 1 (the weights are multiplied by 1.0: unchanged)
        ratio = torch.clamp(limit / norm.clamp(min=limit / 2), max=1.0)
        factor = ratio.sqrt()
        for weight in (module.lora_up.weight, module.lora_down.weight):
            weight.mul_(factor.to(weight.dtype))
        norms.append(norm * ratio)
        scaled.append(ratio < 1.0)
    norms_t = torch.stack(norms)
    return {KEYS_SCALED: torch.stack(scaled).sum().float(), AVERAGE_KEY_NORM: norms_t.mean(), MAX_KEY_NORM: norms_t.max()}
