"""Statistics that are the same on every rank of a data-parallel group are measured and sent by one of them.

After DDP's all-reduce every rank of the DDP process group holds the same gradients, and
(bit-identical updates of bit-identical weights) the same weights: their statistics would be
N copies of one set of numbers. The group's first rank measures and sends them; every other
rank measures none of them (:class:`ReplicaTensors`) and says in each step which rank sent
them (``replicated_by``), while still sending what is its own: its loss, its step time
and its local gradient before the reduction (:mod:`numwatch.capture.local_grads`).

What is not replicated is not deduplicated: a model that is not DDP-wrapped (pipeline
stages, each rank its own part) is measured by every rank that watches it; a DDP group that
is not the whole world (data parallel inside tensor or pipeline parallel) has its own first
rank measuring for it. ``on_nonfinite`` then acts on the replicated gradients on that rank
only (the others still check their loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from numwatch.capture.local_grads import is_ddp
from numwatch.kernels import stats
from numwatch.step.measurement import GradientReading, WatchedTensors


def shard_group_lead(watched: WatchedTensors) -> int | None:
    """For sharded (FSDP2) tensors on a rank that is not its shard group's first: that first rank's global rank.
    Every rank of the group measures its shards (the combining collectives need them all); the first sends."""
    sharding = watched.sharding
    if sharding is None or watched.partition is not None or sharding.group_rank == 0:
        return None  # DeepSpeed ZeRO's partitions: every rank sends its combined numbers (not deduplicated yet)
    return dist.get_global_rank(sharding.group, 0)


def replica_lead(model: nn.Module) -> int | None:
    """For a DDP model on a rank that is not its process group's first: that first rank's global rank; else None."""
    if not is_ddp(model) or not dist.is_initialized():
        return None
    group: dist.ProcessGroup = model.process_group
    if dist.get_world_size(group) <= 1 or dist.get_rank(group) == 0:
        return None
    return dist.get_global_rank(group, 0)


class ReplicaTensors(WatchedTensors):
    """The watched tensors on a rank whose replicated statistics another rank measures: nothing is read."""

    def local_parameters(self) -> list[torch.Tensor]:
        return []  # no weight snapshot, no weight statistics

    def read_gradients(
        self, step: int, grad_multiplier: stats.Multiplier, format_multiplier: stats.Multiplier
    ) -> GradientReading:
        return GradientReading([], [], torch.zeros((2, 0), device=self.device))

    def norms_now(self, reading: GradientReading, grad_multiplier: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(0, device=self.device)

    def weight_parts(
        self,
        reading: GradientReading | None,
        snapshot: list[torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> dict[str, torch.Tensor]:
        return {}

    def quant_parts(self) -> dict[str, torch.Tensor]:
        return {}
