"""Whole-tensor statistics of sharded (DTensor, e.g. FSDP2 ``fully_shard``) parameters.

Each rank measures its local shard; the per-shard results are combined across the shard
group the way ``clip_grad_norm_`` combines DTensor norms: squared norms and counts are
summed, abs-maxima maxed. No full tensor is ever gathered. All sums of a step go in one
``all_reduce`` (float64, exact for counts below 2**53) and all maxima in another, so the
collectives per step do not grow with the number of tensors.

Tensors that are not sharded (plain tensors, or DTensors replicated on the group) hold the
same values on every rank of the group: their sums are counted once (group rank 0's).

Quantization SQNR needs whole rows and blocks: under ``Shard(0)`` (FSDP2's default) a shard
holds whole rows, so int8 (per row) and int4 (groups along the row) are local; NF4's blocks of
64 over the flattened tensor are local when every shard starts on a block boundary (its
first element's flat offset a multiple of 64), else NF4 reports NaN for that tensor; fp8
scales by the global abs-max (one MAX first). The squared norms of w and of w − Q(w) then
add up across the shards. Under ``Shard(d)`` with d > 0 only fp8 is measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from numwatch.kernels.device import to_device
from numwatch.kernels.quantization import NF4_BLOCK, SCHEMES, quantization_sums, sqnr_from_sums, tensor_absmax

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class UnsupportedConfiguration(RuntimeError):
    """A parallel setup numwatch cannot measure correctly (it refuses rather than report wrong numbers)."""


@functools.cache
def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: Tensor) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor (without importing DTensor where distributed is unavailable)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _shard_dim(parameter: DTensor, name: str) -> tuple[DTensor, Any, int] | None:
    """(the parameter, mesh, mesh dim) a DTensor parameter is sharded over; None when it is replicated."""
    from torch.distributed.tensor import Replicate, Shard

    sharded = []
    for mesh_dim, placement in enumerate(parameter.placements):
        if isinstance(placement, Shard):
            sharded.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise UnsupportedConfiguration(
                f"numwatch: parameter {name!r} has placement {type(placement).__name__} ({placement}); only Shard and "
                "Replicate DTensor parameters are supported"
            )
    if len(sharded) > 1:
        raise UnsupportedConfiguration(
            f"numwatch: parameter {name!r} is sharded over {len(sharded)} mesh dimensions (e.g. FSDP + tensor "
            "parallel); only one is supported"
        )
    return (parameter, parameter.device_mesh, sharded[0]) if sharded else None


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard of a parameter lies in it."""

    dim: int  # the tensor dimension it is cut along
    flat_offset: int  # its first element's position in the flattened whole tensor
    empty: bool


def _shard_layout(parameter: DTensor, mesh: Any, mesh_dim: int) -> ShardLayout:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(parameter.shape, mesh, parameter.placements)
    strides = [math.prod(parameter.shape[i + 1 :]) for i in range(parameter.dim())]
    placement = parameter.placements[mesh_dim]
    assert isinstance(placement, Shard)  # _shard_dim found it so
    return ShardLayout(placement.dim, sum(o * s for o, s in zip(offset, strides, strict=True)), math.prod(shape) == 0)


class ShardReduction:
    """Combines per-shard statistics of the watched tensors into whole-tensor ones."""

    def __init__(self, group: dist.ProcessGroup, layouts: Sequence[ShardLayout | None]) -> None:
        self.group = group
        self.group_rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.layouts = list(layouts)  # None: not sharded
        self._sharded = torch.tensor([layout is not None for layout in layouts], dtype=torch.bool)

    @classmethod
    def for_parameters(cls, named_parameters: Sequence[tuple[str, Tensor]]) -> ShardReduction | None:
        """The reduction for these parameters; None when none is a sharded DTensor.

        Raises :class:`UnsupportedConfiguration` for placements it cannot combine (Partial,
        several sharded mesh dimensions, shards over different process groups).
        """
        shards = [_shard_dim(p, name) if is_dtensor(p) else None for name, p in named_parameters]
        groups = {id(mesh.get_group(dim)): mesh.get_group(dim) for _, mesh, dim in (s for s in shards if s is not None)}
        if not groups:
            return None
        if len(groups) > 1:
            raise UnsupportedConfiguration(
                "numwatch: parameters are sharded over different process groups; watch each group's parameters "
                "separately (include=/exclude=)"
            )
        (group,) = groups.values()
        return cls(group, [None if s is None else _shard_layout(*s) for s in shards])

    def _owned(self, positions: Sequence[int] | None, device: torch.device) -> Tensor:
        """bool [k]: whether this rank's values of those tensors enter the sums."""
        sharded = self._sharded if positions is None else self._sharded[list(positions)]
        return to_device(sharded | (self.group_rank == 0), device)

    def reduce(
        self, sums: Sequence[Tensor], maxes: Sequence[Tensor], positions: Sequence[int] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Sum ``sums`` and max ``maxes`` over the shard group (two collectives in all).

        The last dimension of every part indexes the tensors at schema ``positions`` (None:
        all). Results are float64. A NaN anywhere in a max part gives NaN (gloo's max does
        not propagate NaN, so NaN flags travel with the sums).
        """
        device = (list(sums) + list(maxes))[0].device
        owned = self._owned(positions, device)
        nan_flags = [torch.isnan(part).double() for part in maxes]
        summed = [torch.where(owned, part.double(), 0.0) for part in sums] + nan_flags
        maxed = [part.double().nan_to_num(nan=-math.inf) for part in maxes]
        summed = self._all_reduce(summed, dist.ReduceOp.SUM)
        maxed = self._all_reduce(maxed, dist.ReduceOp.MAX)
        flags = summed[len(sums) :]
        return summed[: len(sums)], [
            torch.where(flag > 0, math.nan, part) for part, flag in zip(maxed, flags, strict=True)
        ]

    def _all_reduce(self, parts: list[Tensor], op: dist.ReduceOp.RedOpType) -> list[Tensor]:
        if not parts:
            return []
        flat = torch.cat([part.reshape(-1) for part in parts])
        dist.all_reduce(flat, op=op, group=self.group)
        return [
            piece.view_as(part)
            for piece, part in zip(torch.split(flat, [part.numel() for part in parts]), parts, strict=True)
        ]

    def norms(
        self, norm_stats: Tensor, counts: Sequence[Tensor], positions: Sequence[int] | None
    ) -> tuple[Tensor, list[Tensor]]:
        """Whole-tensor float32 [2, k] (L2 norm, abs-max) from per-shard ones, and int64 count
        parts (last dimension k) summed over the shards, in the same two collectives."""
        summed, (absmax,) = self.reduce([norm_stats[0].double().square(), *counts], [norm_stats[1]], positions)
        norm_sq, *summed_counts = summed
        return torch.stack([norm_sq.sqrt(), absmax]).float(), [c.round().long() for c in summed_counts]

    def counts(self, parts: Sequence[Tensor], positions: Sequence[int] | None) -> list[Tensor]:
        """int64 count parts (last dimension k) summed over the shards: one collective."""
        summed, _ = self.reduce(parts, [], positions)
        return [part.round().long() for part in summed]

    def ranges(self, lows: Tensor, highs: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-tensor float64 (min, max) of the finite values from per-shard ones (NaN where
        a shard has none; both NaN where no shard has any): one collective."""
        # A shard without finite values contributes nothing (-inf) to either maximum.
        negated_low, high = self._all_reduce(
            [(-lows.double()).nan_to_num(nan=-math.inf), highs.double().nan_to_num(nan=-math.inf)], dist.ReduceOp.MAX
        )
        low = -negated_low
        none = low > high
        return low.masked_fill(none, math.nan), high.masked_fill(none, math.nan)

    def sums(self, parts: Sequence[Tensor]) -> list[Tensor]:
        """Float parts (last dimension all tensors) summed over the shards: one collective."""
        summed, _ = self.reduce(parts, [])
        return summed

    def _unmeasured(self, device: torch.device) -> Tensor:
        """bool [1 + len(SCHEMES), n]: the quantization sums this rank's shards cannot give
        (see the module docstring); row 0, ‖w‖², is always local."""
        rows = []
        for layout in self.layouts:
            whole_rows = layout is None or layout.dim == 0
            whole_blocks = layout is None or layout.empty or (layout.dim == 0 and layout.flat_offset % NF4_BLOCK == 0)
            local = {"int8": whole_rows, "int4": whole_rows, "nf4": whole_blocks, "fp8": True}
            rows.append([False, *(not local[scheme] for scheme in SCHEMES)])
        return to_device(torch.tensor(rows, dtype=torch.bool).t(), device)

    def quantization_sqnr(self, shards: Sequence[Tensor], numels: Sequence[int]) -> Tensor:
        """float32 [len(SCHEMES), n] SQNR of the whole tensors from this rank's ``shards`` of
        them (``numels``: the whole tensors' sizes): one MAX (the abs-maxima fp8 scales by)
        and two SUMs (NaN flags, then the squared norms)."""
        _, (amax,) = self.reduce([], [tensor_absmax(shards)])
        sums = quantization_sums(shards, amax)
        sums = sums.masked_fill(self._unmeasured(sums.device), math.nan)
        (summed,) = self.sums([sums])
        empty = to_device(torch.tensor([n == 0 for n in numels]), summed.device)
        return sqnr_from_sums(summed).masked_fill(empty, math.nan)


def from_deepspeed(obj: object) -> bool:
    """Whether ``obj``'s class comes from the ``deepspeed`` package."""
    return type(obj).__module__.split(".")[0] == "deepspeed"


def refuse_unsupported(model: torch.nn.Module, optimizer: object | None) -> None:
    """Raise :class:`UnsupportedConfiguration` for setups whose ``.grad`` does not hold the
    gradients numwatch would report: DeepSpeed objects other than through their engine
    (gradients live in the engine's partitioned buffers; see :mod:`numwatch.capture.deepspeed`)
    and FSDP1 wrappers (flattened, padded shards)."""
    inner = getattr(optimizer, "optimizer", None)  # framework wrappers (Accelerate, Lightning)
    if (
        from_deepspeed(model)
        or from_deepspeed(optimizer)
        or from_deepspeed(inner)
        or any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in model.parameters())
    ):
        raise UnsupportedConfiguration(
            "numwatch: DeepSpeed (ZeRO) keeps gradients in its own partitioned buffers, read through its engine: "
            "watch the engine deepspeed.initialize returned, numwatch.watch(engine)"
        )
    if dist.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            raise UnsupportedConfiguration(
                "numwatch: FSDP1 (FullyShardedDataParallel) flattens and pads parameters; it is not supported. Use "
                "FSDP2 (torch.distributed.fsdp.fully_shard)."
            )
