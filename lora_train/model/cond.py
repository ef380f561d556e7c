"""Batch operations on conditioning, which is a tensor (SD1/SD2) or a dict of tensors (SDXL:
`crossattn`, `vector`; its cached text part `crossattn`, `pooled`), all batch-first."""

from __future__ import annotations

import torch


def cat(conds: list):
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def split(cond) -> list:
    """One entry per sample, detached (what a cache keeps)."""
    if isinstance(cond, dict):
        n = len(next(iter(cond.values())))
        return [{k: v[i].detach() for k, v in cond.items()} for i in range(n)]
    return [c.detach() for c in cond]


def stack(items: list):
    if isinstance(items[0], dict):
        return {k: torch.stack([c[k] for c in items]) for k in items[0]}
    return torch.stack(items)


def repeat(cond, n: int):
    return cat([cond] * n)
