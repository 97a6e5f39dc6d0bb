"""Several processes on one profile or apply job, with torch.distributed.

Launch every process with the same command through `torchrun` (or any launcher that sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT):

    torchrun --nproc_per_node 2 -m bitplan profile smollm2-135m --calib text.jsonl --out prof

Tensors on a GPU go through NCCL, tensors in CPU memory (the float64 factor sums) through gloo. How the work is split:
- calibration windows (the factor pass): data-parallel, the batches dealt round-robin; each layer's sums are
  then reduced onto the one rank that owns the layer (layer k → rank k mod world), which writes its factor file;
- per-layer work (noise injection, coefficients, format errors, rounding): layer-parallel, the same dealing.
Ranks meet through files in the job folder (the resumable state a single process already keeps), so several
nodes need that folder on a shared filesystem. Batches are the same as a single process's and every per-layer
result is computed by exactly the code a single process runs, so only the order of float64 sums differs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import BitplanError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group (rank 0 of 1 when not distributed)."""
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """The group torchrun set up (joined on first use), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # Tensors go through the backend of their device: factor sums live on the CPU even on GPU machines.
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def owner(self, index: int) -> int:
        """The rank that handles item `index` of a list dealt round-robin."""
        return index % self.world

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th one, starting at its rank."""
        return list(items[self.rank::self.world])

    @staticmethod
    def close() -> None:
        """Leave torchrun's group once every rank is done: a gloo group left to the interpreter's exit can abort
        (`terminate called without an active exception`) in a rank that exits while another still works."""
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce_sum(self, t: torch.Tensor, owner: int) -> None:
        """Sum `t` over the ranks onto `owner` (in place there; other ranks' copies are left undefined)."""
        if self.distributed:
            dist.reduce(t, dst=owner, op=dist.ReduceOp.SUM)

    def on_main(self, fn: Callable[[], T], others: Callable[[], T] | None = None) -> T:
        """Run `fn` on rank 0 first (it may create, refuse or write a folder), then `others` (default `fn`) on
        the other ranks: a refusal (BitplanError) on rank 0 is raised on every rank instead of leaving them
        waiting at a barrier."""
        if not self.distributed:
            return fn()
        error = [None]
        if self.main:
            try:
                result = fn()
            except BitplanError as e:
                error[0] = str(e)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise BitplanError(error[0])
        return result if self.main else (others or fn)()
