"""Tensor lists as a few flat chunks per (device, dtype) group.

A statistic computed tensor by tensor dispatches O(n) ops for n tensors: kernel launches
on an accelerator, Python dispatch on the CPU. Here the non-empty tensors of each (device,
dtype) group are concatenated into flat chunks of at most ``CHUNK_ELEMENTS`` elements (one
``_chunk_cat`` each), elementwise work runs once per chunk, and per-tensor results come
from ``split`` + ``torch._foreach_*`` reductions or from one count over
``segment * bins + bin`` keys. So the ops per call grow with the number of groups and
chunks, never with the number of tensors, and the transient memory with the chunk size.
A tensor longer than a chunk is cut into pieces (segments) whose results are combined.

A :class:`Layout` depends only on host metadata (devices, dtypes, sizes): it is cached,
with the small index tensors it needs, copied from pinned memory on CUDA (no sync).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

# 2**24 elements: the 16-layer benchmark model (13 M parameters) is one chunk per group;
# the work on a chunk holds about 32 bytes per element (512 MiB at most) while it runs.
CHUNK_ELEMENTS = 1 << 24

_Key = tuple[torch.device, torch.dtype, int] | None


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``, copied from pinned memory on CUDA so the copy does not synchronize."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _index(values: Sequence[int], device: torch.device) -> Tensor:
    return to_device(torch.tensor(list(values), dtype=torch.int64), device)


class Chunk:
    """Consecutive segments of a group: (member, start, stop) element ranges of its tensors."""

    def __init__(self, pieces: list[tuple[int, int, int]], device: torch.device) -> None:
        self.pieces = pieces
        self.lengths = [stop - start for _, start, stop in pieces]
        self.numel = sum(self.lengths)
        self._starts = _index([sum(self.lengths[:i]) for i in range(1, len(pieces))], device)
        self._offsets_by_bins: dict[int, list[int]] = {}

    def flat(self, members: Sequence[Tensor]) -> Tensor:
        """The chunk's elements of ``members`` (the group's tensors) as one 1-D tensor.

        With a single whole tensor this is a view of it: callers never write into it."""
        parts = []
        for member, start, stop in self.pieces:
            tensor = members[member]
            if start == 0 and stop == tensor.numel():
                parts.append(tensor if tensor.dim() else tensor.reshape(1))
            else:
                parts.append(tensor.reshape(-1)[start:stop])
        if len(parts) == 1:
            return parts[0].reshape(-1)
        return torch._chunk_cat(parts, 0, 1)[0]

    @property
    def fresh(self) -> bool:
        """Whether :meth:`flat` returns new memory (several pieces), which a caller may overwrite."""
        return len(self.pieces) > 1

    def copy(self, members: Sequence[Tensor]) -> Tensor:
        """Like :meth:`flat`, but always fresh memory."""
        flat = self.flat(members)
        return flat if self.fresh else flat.clone()

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-segment views of a chunk-shaped tensor (one op)."""
        return list(flat.split(self.lengths))

    def segment_ids(self) -> Tensor:
        """int64 [numel]: the segment of each element (ones at segment starts, summed up:
        on the CPU ten times cheaper than ``repeat_interleave``, and sync-free on CUDA)."""
        ids = torch.zeros(self.numel, dtype=torch.int64, device=self._starts.device)
        return ids.index_fill_(0, self._starts, 1).cumsum_(0)

    def keys(self, codes: Tensor, bins: int) -> Tensor:
        """segment * bins + code for each element's code 0..bins-1, written into ``codes`` (a
        fresh integer tensor wide enough for them): counting these keys over
        ``len(pieces) * bins`` values gives the codes' counts per segment.

        One multi-tensor add of each segment's offset to its view: a pass over the codes alone,
        where building per-element segment ids costs three passes over a wider tensor."""
        if len(self.pieces) > 1:
            torch._foreach_add_(self.split(codes), self._offsets(bins))
        return codes

    def _offsets(self, bins: int) -> list[int]:
        offsets = self._offsets_by_bins.get(bins)
        if offsets is None:
            offsets = self._offsets_by_bins[bins] = [segment * bins for segment in range(len(self.pieces))]
        return offsets


class Group:
    """The non-empty tensors of one (device, dtype), as chunks."""

    def __init__(self, device: torch.device, dtype: torch.dtype, members: list[int], numels: list[int], chunk_elements: int) -> None:
        self.device = device
        self.dtype = dtype
        self.members = members  # positions in the input list
        self.numels = numels
        plans = _plan(numels, chunk_elements)
        self.chunks = [Chunk(plan, device) for plan in plans]
        segment_members = [member for plan in plans for member, _, _ in plan]
        # Members cut into several segments: their results are combined through this index.
        self._segment_members = _index(segment_members, device) if len(segment_members) > len(members) else None
        self._positions = _index(members, device)

    def tensors(self, tensors: Sequence[Tensor | None]) -> list[Tensor]:
        return [tensors[position] for position in self.members]  # type: ignore[misc]

    def select(self, per_position: Tensor) -> Tensor:
        """Rows of a per-input-position tensor for this group's members, on its device."""
        return per_position.to(self.device, non_blocking=True).index_select(0, self._positions)

    def per_segment(self, per_member: Tensor) -> Tensor:
        """A per-member tensor spread over the segments (members cut into pieces repeat)."""
        return per_member if self._segment_members is None else per_member.index_select(0, self._segment_members)

    def chunk_slices(self, per_segment: Tensor) -> list[Tensor]:
        """A per-segment tensor cut into the chunks' parts."""
        return list(per_segment.split([len(chunk.pieces) for chunk in self.chunks]))

    def per_member(self, per_chunk: list[Tensor], how: str) -> Tensor:
        """Per-member results from the chunks' per-segment ones; ``how`` combines the
        segments of a member cut into pieces: "sum", "norm" (L2), "amax" or "amin"."""
        segments = per_chunk[0] if len(per_chunk) == 1 else torch.cat(per_chunk)
        index = self._segment_members
        if index is None:
            return segments
        k = len(self.members)
        if how == "sum":
            return segments.new_zeros((k, *segments.shape[1:])).index_add_(0, index, segments)
        if how == "norm":
            return segments.new_zeros(k).index_add_(0, index, segments * segments).sqrt_()
        return segments.new_zeros(k).scatter_reduce_(0, index, segments, how, include_self=False)


def _plan(numels: list[int], chunk_elements: int) -> list[list[tuple[int, int, int]]]:
    """Members packed in order into chunks; only a member longer than a chunk is cut."""
    plans: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = chunk_elements
    for member, numel in enumerate(numels):
        if numel > room and numel <= chunk_elements:
            plans.append(current)
            current, room = [], chunk_elements
        start = 0
        while start < numel:
            take = min(numel - start, room)
            current.append((member, start, start + take))
            start += take
            room -= take
            if room == 0:
                plans.append(current)
                current, room = [], chunk_elements
    if current:
        plans.append(current)
    return [plan for plan in plans if plan]


class Layout:
    """Tensors (None and empty ones are left out) grouped by (device, dtype) into chunks."""

    def __init__(self, keys: tuple[_Key, ...], chunk_elements: int) -> None:
        self.n = len(keys)
        self.device = next((key[0] for key in keys if key is not None), torch.device("cpu"))
        by_group: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[int]]] = {}
        for position, key in enumerate(keys):
            if key is not None and key[2] > 0:
                members, numels = by_group.setdefault((key[0], key[1]), ([], []))
                members.append(position)
                numels.append(key[2])
        self.groups = [Group(device, dtype, members, numels, chunk_elements) for (device, dtype), (members, numels) in by_group.items()]
        # Row of each input position in cat(group results..., fill row); None when that is the identity.
        present = sum(len(group.members) for group in self.groups)
        rows = [present] * self.n  # the fill row
        for row, position in enumerate(position for group in self.groups for position in group.members):
            rows[position] = row
        identity = present == self.n and rows == list(range(self.n))
        self._order = None if identity else _index(rows, self.device)

    def assemble(self, per_group: list[Tensor], fill: float, dtype: torch.dtype, tail: tuple[int, ...] = ()) -> Tensor:
        """[n, *tail] in input order from each group's [members, *tail] results; ``fill``
        for the tensors left out (None or empty)."""
        return self._assemble(per_group, fill, dtype, (1, *tail), 0)

    def columns(self, per_group: list[Tensor], fill: float, dtype: torch.dtype, rows: int) -> Tensor:
        """[rows, n] in input order from each group's [rows, members] results (``fill`` as in
        :meth:`assemble`): row-major statistics without a transposing copy."""
        return self._assemble(per_group, fill, dtype, (rows, 1), 1)

    def _assemble(self, per_group: list[Tensor], fill: float, dtype: torch.dtype, one: tuple[int, ...], dim: int) -> Tensor:
        parts = [part.to(self.device, non_blocking=True) for part in per_group]
        if not self.n:
            return torch.zeros(one[:dim] + (0,) + one[dim + 1:], dtype=dtype, device=self.device)
        if self._order is None:
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        parts.append(torch.full(one, fill, dtype=dtype, device=self.device))
        return torch.cat(parts, dim).index_select(dim, self._order)


@functools.lru_cache(maxsize=64)
def _layout(keys: tuple[_Key, ...], chunk_elements: int) -> Layout:
    return Layout(keys, chunk_elements)


def layout_of(tensors: Sequence[Tensor | None]) -> Layout:
    """The cached :class:`Layout` of ``tensors`` (looked up by devices, dtypes and sizes)."""
    keys = tuple(None if t is None else (t.device, t.dtype, t.numel()) for t in tensors)
    return _layout(keys, CHUNK_ELEMENTS)
