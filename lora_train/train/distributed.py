"""Data parallel training under `accelerate launch` (or torchrun): one process per device.

Every process draws the same global batch (same data order, captions, noise and timesteps from
the same seeded generators) and trains on its own slice of it; LoRA gradients are summed across
processes, each slice's loss being divided by the global batch size. So N processes with batch B
compute what one process with batch N x B computes. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def local_slice(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n samples (the last ones may be short)."""
        per = -(-n // self.world)
        return slice(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        if self.world > 1 and tensors:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world > 1:
            untouched = [p for p in params if p.grad is None]
            for p in untouched:
                p.grad = torch.zeros_like(p)
            self.sum_([p.grad for p in params])
            # a parameter no process computed a gradient for (DyLoRA's ranks not drawn this step) stays
            # without one, so the optimizer leaves it alone instead of moving it by momentum and decay
            for p in untouched:
                if not p.grad.any():
                    p.grad = None
