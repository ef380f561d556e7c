"""sd-scripts' `scale_weight_norms`: max-norm regularisation of the network's modules, after each
optimizer step, as sd-scripts' networks.lora and LyCORIS' `apply_max_norm` do it.

For every module that has one, a tensor's norm is capped at the limit: for LoRA / LoCon / LoHa / LoKr
the weight change (scale included, the multiplier and DoRA left out), for (B)OFT its blocks. A module
above the limit is scaled by limit / norm through its trained factors (`NetworkModule.scale_max_norm_`).
LyCORIS leaves IA3, full, GLoRA and norm modules alone, and DyLoRA has no max-norm in either tool;
they are left alone here too, with a note. The statistics are the norms after scaling, as sd-scripts
logs them (`max_norm/keys_scaled`, `norm/avg_key_norm`, `max_norm/max_key_norm`).
"""

from __future__ import annotations

import torch

from lora_train.errors import UserError, msg

# the names sd-scripts logs them under (its TensorBoard / wandb keys)
KEYS_SCALED, AVERAGE_KEY_NORM, MAX_KEY_NORM = "max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm"


def check(network, limit: float | None) -> list[str]:
    """Refuse a limit that is not positive; the notes name the modules it leaves alone."""
    if not limit:
        return []
    if limit < 0:
        raise UserError(msg("scale_weight_norms must be a positive number (sd-scripts suggests 1), got {value}", value=limit))
    left: dict[str, list[str]] = {}
    for name, module in network.lora_modules.items():
        if _tensor(module) is None:
            left.setdefault(module.algorithm, []).append(name)
    if left and sum(map(len, left.values())) == len(network.lora_modules):
        raise UserError(msg("scale_weight_norms: {algorithm} modules have no max-norm (in LyCORIS and sd-scripts neither); "
                            "remove scale_weight_norms", algorithm=", ".join(sorted(left))))
    return [msg("scale_weight_norms leaves the {count} {algorithm} modules alone (e.g. {name}), as LyCORIS does",
                count=len(names), algorithm=algorithm, name=names[0]) for algorithm, names in left.items()]


def _tensor(module) -> torch.Tensor | None:
    was = module.training
    module.train(False)  # no rank dropout in the norm
    try:
        return module.max_norm_tensor()
    finally:
        module.train(was)


@torch.no_grad()
def apply(network, limit: float) -> dict[str, torch.Tensor]:
    """Scale the modules above `limit`; the statistics stay on the device (read them back when the loss is)."""
    norms, scaled = [], []
    for module in network.lora_modules.values():
        tensor = _tensor(module)
        if tensor is None:
            continue
        norm = tensor.float().norm()
        # above the limit, ratio = limit / norm; at or below it, exactly 1 (the weights are multiplied by 1.0: unchanged)
        ratio = torch.clamp(limit / norm.clamp(min=limit / 2), max=1.0)
        module.scale_max_norm_(ratio)
        norms.append(norm * ratio)
        scaled.append(ratio < 1.0)
    norms_t = torch.stack(norms)
    return {KEYS_SCALED: torch.stack(scaled).sum().float(), AVERAGE_KEY_NORM: norms_t.mean(), MAX_KEY_NORM: norms_t.max()}
