"""DoRA (LyCORIS' `dora_wd=True`): the merged weight W + dW is split into a direction and a trained
magnitude `dora_scale`, W' = (W + dW) * dora_scale / ||W + dW||, with the norm taken per output row
(`wd_on_out`, LyCORIS' default, dora_scale shaped (out, 1, ...)) or per input column (dora_scale
shaped (1, in, ...), what A1111 v1.10's Lora loader assumes for every file).

The multiplier scales the whole change, W + m * (W' - W), as A1111's and ComfyUI's loaders apply a
file (`<lora:name:m>`): weight 0 is the base model. LyCORIS' own module blends the magnitude only,
W_m * (m * (dora_scale / ||W_m|| - 1) + 1) with W_m = W + dW, which at weight 0 still adds all of dW;
the two agree at weight 1, where training happens."""

from __future__ import annotations

import torch


def norm(weight: torch.Tensor, wd_on_out: bool) -> torch.Tensor:
    """||weight|| per output row (shape (out, 1, ...)) or per input column (shape (1, in, ...))."""
    ones = [1] * (weight.dim() - 1)
    if wd_on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *ones)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(weight.shape[1], *ones).transpose(0, 1)


def on_out(dora_scale: torch.Tensor, weight_shape: torch.Size) -> bool:
    """Which way a file's dora_scale was taken, from its shape (ComfyUI reads it the same way)."""
    return dora_scale.shape[0] == weight_shape[0] and dora_scale.numel() == weight_shape[0]


def decomposed_delta(weight: torch.Tensor, weight_delta: torch.Tensor, dora_scale: torch.Tensor, multiplier: float,
                     wd_on_out: bool) -> torch.Tensor:
    """The change to `weight` that DoRA makes with `weight_delta` (at multiplier 1) and `dora_scale`."""
    merged = weight.to(weight_delta.dtype) + weight_delta
    # LyCORIS adds eps to the norm, so a zero row cannot divide by zero
    scale = dora_scale.to(merged.dtype) / (norm(merged, wd_on_out) + torch.finfo(merged.dtype).eps)
    change = merged * scale - weight.to(merged.dtype)
    return change if multiplier == 1 else change * multiplier
