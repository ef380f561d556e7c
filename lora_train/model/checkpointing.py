"""Gradient checkpointing that LoRA survives.

ldm (and sgm) blocks carry their own checkpoint flags (`use_checkpoint`, `checkpoint`) that use a
reentrant checkpoint which only differentiates the block's *own* parameters: a LoRA hooked onto
modules inside gets no gradient, silently. We switch those flags off for the run and, when asked,
checkpoint whole UNet blocks with torch's non-reentrant checkpoint instead, by setting an instance
`forward` (the module stays in the tree under its name), restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

FLAG_NAMES = ("use_checkpoint", "checkpoint")


@contextlib.contextmanager
def own_checkpoint_flags_off(root: nn.Module):
    saved = []
    for module in root.modules():
        for name in FLAG_NAMES:
            value = module.__dict__.get(name)
            if isinstance(value, bool) and value:
                saved.append((module, name))
                setattr(module, name, False)
    try:
        yield len(saved)
    finally:
        for module, name in saved:
            setattr(module, name, True)


def _generator_contexts(generator: torch.Generator | None):
    """Forward/recompute contexts that replay our dropout generator, as torch does for its global RNG."""
    if generator is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    saved = {}

    @contextlib.contextmanager
    def forward():
        saved["state"] = generator.get_state()
        yield

    @contextlib.contextmanager
    def recompute():
        now = generator.get_state()
        generator.set_state(saved["state"])
        try:
            yield
        finally:
            generator.set_state(now)

    return forward(), recompute()


@contextlib.contextmanager
def checkpointed(blocks: Iterable[nn.Module], generator: torch.Generator | None = None):
    """Run each block's forward under non-reentrant checkpointing while the context is open."""
    wrapped = []

    def wrap(block: nn.Module):
        # a forward the host already set on the instance is kept and put back afterwards
        own = block.__dict__.get("forward")
        original = own if own is not None else block.forward

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            return checkpoint(original, *args, use_reentrant=False,
                              context_fn=lambda: _generator_contexts(generator), **kwargs)

        block.forward = forward
        wrapped.append((block, own))

    try:
        for block in blocks:
            wrap(block)
        yield
    finally:
        for block, own in wrapped:
            if own is None:
                del block.forward
            else:
                block.forward = own
