"""What crosses ranks under torch.distributed, and nothing else."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["DataParallel"]


class DataParallel:
    """The data-parallel view of one process: where gradients are observed and how step statistics are reduced.

    Args:
        process_group: the data-parallel group (default: the world group when ``torch.distributed`` is
            initialised, else a single process).
    """

    def __init__(self, process_group: Any = None) -> None:
        self.group = process_group
        self.world_size = (
            dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
        )

    def register_grad_hook(self, p: torch.Tensor, fn: Callable[[torch.Tensor], None]):
        """Observe each backward's gradient contribution to ``p`` before it is accumulated into ``.grad``."""
        return p.register_hook(fn)

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The accumulated gradient of ``p`` held by this rank (the local shard for sharded parameters)."""
        g = p.grad
        if g is not None and hasattr(g, "to_local"):
            g = g.to_local()
        return g

    def local_microbatches(self, backwards: int) -> int:
        """How many microbatches this rank's ``.grad`` sums over."""
        return backwards

    def reduce_step(self, packed: torch.Tensor, *, k_local: int, inv_sizes: float, big_slice: slice,
                    layer_big_slice: slice | None) -> dict[str, Any]:
        """Combine one step's statistics across ranks (one collective); single process: unchanged."""
        return {"values": packed, "microbatches": k_local, "inv_sizes": inv_sizes}
