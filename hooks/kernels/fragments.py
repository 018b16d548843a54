"""Whole-tensor statistics from flat fragments: each rank holds one contiguous range of each
tensor's flattened elements (DeepSpeed ZeRO's partitions), possibly empty.

The sums and maxima combine exactly as for DTensor shards (:class:`ShardReduction`, whose
two collectives per step this reuses): every fragment is this rank's own, so every rank's
values enter the sums. Quantization SQNR needs whole rows and blocks, which a fragment may
cut. A fragment of a tensor with at least two dimensions is measured as its rows when it
starts and ends on row boundaries (int8 per row, int4 per group of the row), and as one
flat row otherwise, where int8 and int4 report NaN. NF4's blocks of 64 over the flattened
tensor are local when the fragment starts on a block boundary. A fragment that ends inside
a row or block leaves the rest to a fragment that starts inside it, whose NaN then makes
the whole tensor's value NaN: no tensor gets a value from cut rows or blocks. fp8 scales by
the global abs-max and is always measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from numwatch.kernels.device import to_device
from numwatch.kernels.quantization import NF4_BLOCK, SCHEMES
from numwatch.kernels.sharded import ShardLayout, ShardReduction


@dataclass(frozen=True)
class Fragment:
    """This rank's part of one tensor: ``numel`` elements from ``start`` of the flattened whole."""

    shape: tuple[int, ...]  # the whole tensor's
    start: int
    numel: int

    @property
    def row(self) -> int:
        """Elements per row (dim 0) of the whole tensor; 0 for tensors with fewer than two dimensions."""
        return math.prod(self.shape[1:]) if len(self.shape) >= 2 else 0

    @property
    def whole_rows(self) -> bool:
        return self.row > 0 and self.start % self.row == 0 and self.numel % self.row == 0

    def rows(self, flat: Tensor) -> Tensor:
        """The fragment's flat values shaped for quantization: its rows where it holds whole
        rows, else one row (a tensor below two dimensions stays flat: the schemes skip it)."""
        if self.row == 0:
            return flat
        if self.whole_rows:
            return flat.view(self.numel // self.row, self.row)
        return flat.view(1, self.numel)


class FragmentReduction(ShardReduction):
    """Combines per-fragment statistics of the watched tensors into whole-tensor ones."""

    def __init__(self, group: dist.ProcessGroup, fragments: Sequence[Fragment]) -> None:
        # Every fragment is owned: its values enter the sums on every rank.
        super().__init__(group, [ShardLayout(0, f.start, f.numel == 0) for f in fragments])
        self.fragments = list(fragments)

    def _unmeasured(self, device: torch.device) -> Tensor:
        rows = []
        for fragment in self.fragments:
            empty = fragment.numel == 0
            local = {
                "int8": empty or fragment.whole_rows,
                "int4": empty or fragment.whole_rows,
                "nf4": empty or fragment.start % NF4_BLOCK == 0,
                "fp8": True,
            }
            rows.append([False, *(not local[scheme] for scheme in SCHEMES)])
        return to_device(torch.tensor(rows, dtype=torch.bool).t(), device)

    def quantization_sqnr(self, shards: Sequence[Tensor], numels: Sequence[int]) -> Tensor:
        """As :meth:`ShardReduction.quantization_sqnr`, from flat fragments."""
        return super().quantization_sqnr(
            [fragment.rows(flat) for fragment, flat in zip(self.fragments, shards, strict=True)], numels
        )
