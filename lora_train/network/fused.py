"""LoRA on the q, k, v and out projections of a fused `nn.MultiheadAttention` (OpenCLIP's text
encoder: SD2's, and SDXL's second one).

sd-scripts names these modules as Hugging Face CLIP has them (`self_attn_q_proj` ...), and the
WebUI's Lora loader applies a file to a MultiheadAttention only when all four are present. torch's
MultiheadAttention never calls its projections as modules (one fused `in_proj_weight`, and
`out_proj.weight` read directly), so no forward hook can reach them. While any part is attached we
give the attention an instance `forward` that computes the projections itself, each with its
module's `forward_delta` added; the module, its weights and its name stay as they are, and
detaching the last part deletes the instance attribute again. Without attention weights asked for
(OpenCLIP asks for none) the attention itself runs through SDPA, as torch's own forward does then.

A module's `delta()` on a part is the change to that part's weight (`part_weight`), [embed_dim,
embed_dim]: q, k and v are the three row blocks of `in_proj_weight`, out is `out_proj.weight`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PARTS = ("q", "k", "v", "out")
_SLOT = "_lora_train_parts"


def part_weight(mha: nn.MultiheadAttention, part: str) -> torch.Tensor:
    """The weight of one projection (a view into the attention's own parameters)."""
    if part == "out":
        return mha.out_proj.weight
    if part not in PARTS:
        raise ValueError(f"unknown attention part '{part}' (known: {', '.join(PARTS)})")
    return mha.in_proj_weight.chunk(3)["qkv".index(part)]


def attach(mha: nn.MultiheadAttention, part: str, lora: nn.Module) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown attention part '{part}' (known: {', '.join(PARTS)})")
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise TypeError("LoRA on a MultiheadAttention needs one fused in_proj, no bias_k/bias_v and no add_zero_attn")
    parts = mha.__dict__.get(_SLOT)
    if parts is None:
        if "forward" in mha.__dict__:
            raise RuntimeError("this MultiheadAttention already has an instance forward; refusing to stack another")
        parts = mha.__dict__[_SLOT] = {}
        mha.forward = _forward_with(mha)
    if part in parts:
        raise RuntimeError(f"a LoRA is already attached to the attention's {part} projection")
    parts[part] = lora


def detach(mha: nn.MultiheadAttention, part: str) -> None:
    parts = mha.__dict__.get(_SLOT)
    if not parts or part not in parts:
        return
    del parts[part]
    if not parts:
        del mha.__dict__[_SLOT]
        del mha.forward


def _with_delta(y: torch.Tensor, x: torch.Tensor, lora: nn.Module | None) -> torch.Tensor:
    if lora is None:
        return y
    delta = lora.forward_delta(x)
    return y if delta is None else y + delta.to(y.dtype)


def _forward_with(mha: nn.MultiheadAttention):
    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        parts = mha.__dict__[_SLOT]
        if mha.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, N, E) from here on, as torch's functional attention has it
        length, batch, embed = query.shape
        source = key.shape[0]
        heads = mha.num_heads
        head_dim = embed // heads
        wq, wk, wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        q = _with_delta(F.linear(query, wq, bq), query, parts.get("q"))
        k = _with_delta(F.linear(key, wk, bk), key, parts.get("k"))
        v = _with_delta(F.linear(value, wv, bv), value, parts.get("v"))

        q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)
        k = k.reshape(source, batch * heads, head_dim).transpose(0, 1)
        v = v.reshape(source, batch * heads, head_dim).transpose(0, 1)
        mask = _merged_mask(attn_mask, key_padding_mask, is_causal, batch, heads, length, source, q.dtype, q.device)
        dropout = mha.dropout if mha.training else 0.0
        if need_weights:
            scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(head_dim)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, p=dropout)
            attn = torch.bmm(weights, v)
        else:  # what torch's own forward does without weights (OpenCLIP asks for none): no matrix kept for backward
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        attn = attn.transpose(0, 1).reshape(length, batch, embed)
        out = _with_delta(F.linear(attn, mha.out_proj.weight, mha.out_proj.bias), attn, parts.get("out"))
        if mha.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(batch, heads, length, source)
        return out, (weights.mean(dim=1) if average_attn_weights else weights)

    return forward


def _merged_mask(attn_mask, key_padding_mask, is_causal, batch, heads, length, source, dtype, device):
    """One additive mask of shape (N*H, L, S) from torch's mask arguments, or None."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m.to(device), float("-inf"))
        return m.to(device=device, dtype=dtype)

    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(batch, 1, 1, source).expand(batch, heads, 1, source).reshape(batch * heads, 1, source)
        mask = pad if mask is None else mask + pad
    return mask
