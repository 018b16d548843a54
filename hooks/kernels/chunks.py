"""Tensor lists as a few flat chunks per (device, dtype) group.

A statistic computed tensor by tensor dispatches O(n) ops for n tensors: kernel launches
on an accelerator, Python dispatch on the CPU. Here the non-empty tensors of each (device,
dtype) group are concatenated into flat chunks of at most ``FLAT_CHUNK_ELEMENTS`` elements (one
``_chunk_cat`` each), elementwise work runs once per chunk, and per-tensor results come
from ``split`` + ``torch._foreach_*`` reductions or from one count over
``segment * bins + bin`` keys. So the ops per call grow with the number of groups and
chunks, never with the number of tensors, and the transient memory with the chunk size.
A tensor longer than a chunk is cut into pieces (segments) whose results are combined.

Temporaries as large as a chunk come from :func:`scratch` on the CPU: its allocator hands
large blocks back to the operating system, and faulting their pages in again costs more
than the arithmetic on them (about 10x for an elementwise op on a fresh 15 MB tensor).

A :class:`Layout` depends only on host metadata (devices, dtypes, sizes): it is cached,
with the small index tensors it needs, copied from pinned memory on CUDA (no sync).
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from numwatch.kernels.device import accelerator_path, to_device

# 2**24 elements: the 16-layer benchmark model (13 M parameters) is one chunk per group;
# the work on a chunk holds about 32 bytes per element (512 MiB at most) while it runs.
FLAT_CHUNK_ELEMENTS = 1 << 24

_Key = tuple[torch.device, torch.dtype, int] | None


class _Scratch(threading.local):
    """Per thread (two models trained in two threads must not share a temporary), per CPU
    scratch slot: one byte buffer, grown to the largest chunk it served, and the views of it
    handed out (cached: a view taken anew each call would add ops to every call)."""

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}
        self.views: dict[tuple[int, tuple[int, ...], torch.dtype], Tensor] = {}


_scratch = _Scratch()
_MAX_VIEWS = 256

# Scratch slots of the chunk-sized temporaries of one call: a chunk's input copy, then up to
# three work tensors. A slot holds one temporary at a time.
INPUT, WORK, SECOND, FLAGS = 0, 1, 2, 3


def scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int) -> Tensor:
    """An uninitialised 1-D ``dtype`` tensor of ``numel`` elements for a temporary of one call.

    On the CPU path a view of a buffer kept for ``slot`` between calls; elsewhere fresh memory
    (the device's caching allocator reuses blocks itself). A caller uses each slot for one
    temporary at a time and never returns it; the buffers stay bounded by the chunk size
    and are dropped by :func:`release_scratch`."""
    return _scratch_shaped((numel,), dtype, device, slot)


def _scratch_shaped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: int) -> Tensor:
    if accelerator_path(device):
        return torch.empty(shape, dtype=dtype, device=device)
    views = _scratch.views
    view = views.get((slot, shape, dtype))
    if view is not None:
        return view
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = _scratch.buffers.get(slot)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _scratch.buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
        for key in [key for key in views if key[0] == slot]:
            del views[key]
    if len(views) >= _MAX_VIEWS:  # chunk sizes that keep changing: start over rather than grow
        views.clear()
    view = views[(slot, shape, dtype)] = buffer[:nbytes].view(dtype).view(shape)
    return view


def release_scratch() -> None:
    """Drop this thread's CPU scratch buffers (a watcher detached; another thread's go with it)."""
    _scratch.buffers.clear()
    _scratch.views.clear()


def _index(values: Sequence[int], device: torch.device) -> Tensor:
    return to_device(torch.tensor(list(values), dtype=torch.int64), device)


class Chunk:
    """Consecutive segments of a group: (member, start, stop) element ranges of its tensors."""

    def __init__(self, pieces: list[tuple[int, int, int]], device: torch.device, numels: Sequence[int]) -> None:
        self.pieces = pieces
        self.lengths = [stop - start for _, start, stop in pieces]
        self.numel = sum(self.lengths)
        self._starts = _index([sum(self.lengths[:i]) for i in range(1, len(pieces))], device)
        # Decided once from the sizes (``numels``: the group's), not per call: the pieces' members,
        # those that are cut, and the whole one-element ones (which may be 0-d).
        self._members = [member for member, _, _ in pieces]
        self._cut = [i for i, (member, start, stop) in enumerate(pieces) if stop - start != numels[member]]
        self._single = [i for i, (member, start, stop) in enumerate(pieces) if numels[member] == 1]
        self._ids: Tensor | None = None
        self._by_shape: _ShapePlan | None = None

    def _parts(self, members: Sequence[Tensor]) -> list[Tensor]:
        """The chunk's pieces of ``members`` (the group's tensors): whole tensors as they are
        (no per-tensor reshape op), cut ones as 1-D slices."""
        parts = [members[member] for member in self._members]
        for i in self._single:
            if not parts[i].dim():
                parts[i] = parts[i].reshape(1)
        for i in self._cut:
            _, start, stop = self.pieces[i]
            parts[i] = parts[i].reshape(-1)[start:stop]
        return parts

    def flat(self, members: Sequence[Tensor]) -> Tensor:
        """The chunk's elements of ``members`` (the group's tensors) as one 1-D tensor.

        A view where the pieces lie back to back in one storage (a single whole tensor, the
        views of a :func:`numwatch.kernels.stats.snapshot`), else a copy: callers never write into it."""
        parts = self._parts(members)
        view = self._view(parts)
        return torch._chunk_cat(parts, 0, 1)[0] if view is None else view

    def _view(self, parts: list[Tensor]) -> Tensor | None:
        """The chunk's ``parts`` as a 1-D view, or None where they are not back to back."""
        if len(parts) == 1:
            return parts[0].reshape(-1)
        if _back_to_back(parts):
            first = parts[0]
            return first.as_strided((self.numel,), (1,), first.storage_offset())
        return None

    def read(self, members: Sequence[Tensor], slot: int) -> Tensor:
        """Like :meth:`flat` (read-only), a copy going into scratch ``slot``."""
        parts = self._parts(members)
        view = self._view(parts)
        return self._into(parts, slot) if view is None else view

    def read_by_shape(self, members: Sequence[Tensor], slot: int) -> tuple[Tensor, Tensor]:
        """Like :meth:`read`, but the elements in an order of their own, with each element's segment
        (int64): for per-segment reductions of chunks of whole (small) members on the CPU.

        The members of one trailing shape are gathered by one ``cat`` (a ``stack`` for 0-d ones)
        into scratch ``slot``: no op per tensor, where ``_chunk_cat`` reshapes each one, which for
        hundreds of small tensors costs a few times more than the copy."""
        assert not self._cut, "whole members only"
        view = self._view(self._parts(members)) if len(self.pieces) <= 2 else None
        if view is not None:
            return view, self.segment_ids(keep=True)
        plan = self._by_shape
        if plan is not None and plan.fits(members):
            try:
                return plan.gather(members, slot), plan.ids
            except RuntimeError:  # a member of another shape (of the same size) than planned: cat refuses it
                pass
        plan = self._by_shape = _ShapePlan(self, members)
        return plan.gather(members, slot), plan.ids

    def into(self, members: Sequence[Tensor], slot: int, dtype: torch.dtype | None = None) -> Tensor:
        """The chunk's elements of ``members`` copied into scratch ``slot`` (converted to
        ``dtype``, by default the members'): a writable temporary."""
        return self._into(self._parts(members), slot, dtype)

    def _into(self, parts: list[Tensor], slot: int, dtype: torch.dtype | None = None) -> Tensor:
        dtype, device = dtype or parts[0].dtype, parts[0].device
        if len(parts) == 1:
            return scratch(self.numel, dtype, device, slot).copy_(parts[0].reshape(-1))
        out = _scratch_shaped((1, self.numel), dtype, device, slot)
        torch._chunk_cat(parts, 0, 1, out=out)
        return out.view(-1)

    def copy(self, members: Sequence[Tensor]) -> Tensor:
        """Like :meth:`flat`, but always fresh memory."""
        parts = self._parts(members)
        return parts[0].reshape(-1).clone() if len(parts) == 1 else torch._chunk_cat(parts, 0, 1)[0]

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-segment views of a chunk-shaped tensor (one op)."""
        return list(torch.split(flat, self.lengths))

    def sums(self, marks: Tensor) -> Tensor:
        """[segments]: how many elements of each segment are 1 in float 0/1 ``marks``, in
        their dtype. A multi-tensor L1 norm (exact in float32 up to a chunk's 2**24 elements),
        cheaper than a count over keys on the CPU and without atomics on a few counters on a GPU."""
        return torch.stack(torch._foreach_norm(self.split(marks), 1))

    def segment_ids(self, keep: bool = False) -> Tensor:
        """int64 [numel]: the segment of each element (ones at segment starts, summed up:
        on the CPU ten times cheaper than ``repeat_interleave``, and sync-free on CUDA);
        ``keep``: kept with the chunk for the next call (for chunks of small tensors)."""
        if self._ids is not None:
            return self._ids
        ids = torch.zeros(self.numel, dtype=torch.int64, device=self._starts.device)
        ids = ids.index_fill_(0, self._starts, 1).cumsum_(0)
        if keep:
            self._ids = ids
        return ids

    def keys(self, codes: Tensor, bins: int) -> Tensor:
        """segment * bins + code for each element's code 0..bins-1: counting these keys
        over ``len(pieces) * bins`` values gives the codes' counts per segment.

        ``codes`` (a fresh tensor) may be overwritten. The keys are int32 where they fit (half
        the memory traffic of int64); each segment's offset is added to its view by one
        multi-tensor op of host constants, with no per-element segment index."""
        segments = len(self.pieces)
        wide = segments * bins >= 1 << 31
        if wide and codes.dtype != torch.int64:
            codes = codes.to(torch.int64)
        elif not wide and codes.dtype not in (torch.int32, torch.int64):
            codes = codes.to(torch.int32)
        if segments > 1:
            torch._foreach_add_(self.split(codes), [segment * bins for segment in range(segments)])
        return codes

    def per_segment_(self, flat: Tensor, *operations: tuple[str, Tensor]) -> Tensor:
        """``flat`` (a fresh chunk-shaped tensor) combined in place, in order, with per-segment
        values by in-place operations named "sub" or "div": each element with its segment's value.

        On the CPU one multi-tensor op per operation, on the segments' views, with the values'
        one-element views: no per-element index. Elsewhere the values are spread over the elements by
        one gather (a multi-tensor op with tensor operands would launch a kernel per segment)."""
        if len(self.pieces) == 1:
            for name, values in operations:
                getattr(flat, f"{name}_")(values.reshape(()))
        elif not accelerator_path(flat.device):
            views = self.split(flat)
            for name, values in operations:
                getattr(torch, f"_foreach_{name}_")(views, list(torch.split(values, 1)))
        else:
            ids = self.segment_ids()
            for name, values in operations:
                getattr(flat, f"{name}_")(values.index_select(0, ids))
        return flat


def _picker(positions: list[int]) -> Callable[[Sequence[Tensor]], tuple[Tensor, ...]]:
    """A function taking these positions of a sequence, as a tuple (one C call, not a loop)."""
    if len(positions) == 1:
        only = positions[0]
        return lambda items: (items[only],)
    return operator.itemgetter(*positions)


class _ShapePlan:
    """How :meth:`Chunk.read_by_shape` gathers a chunk's members: per trailing shape (dims after the
    first; 0-d members apart) the members, and where their elements go in the chunk's copy."""

    def __init__(self, chunk: Chunk, members: Sequence[Tensor]) -> None:
        buckets: dict[tuple[int, ...] | None, list[int]] = {}  # None: the 0-d members
        for member in chunk._members:
            tensor = members[member]
            buckets.setdefault(tuple(tensor.shape[1:]) if tensor.dim() else None, []).append(member)
        self._shapes = [tuple(members[member].shape) for member in chunk._members]
        self._members = chunk._members
        self._dtype, self._device, self._numel = members[chunk._members[0]].dtype, chunk._starts.device, chunk.numel
        self._spans: list[tuple[int, int, tuple[int, ...] | None]] = []
        self._pickers = []
        order: list[int] = []  # the chunk's segment of each member, in gathered order
        segment_of = {member: segment for segment, member in enumerate(chunk._members)}
        start = 0
        for trailing, bucket in buckets.items():
            stop = start + sum(chunk.lengths[segment_of[member]] for member in bucket)
            self._spans.append((start, stop, trailing))
            self._pickers.append(_picker(bucket))
            order.extend(segment_of[member] for member in bucket)
            start = stop
        lengths = [chunk.lengths[segment] for segment in order]
        self.ids = torch.repeat_interleave(torch.tensor(order, dtype=torch.int64), torch.tensor(lengths)).to(
            self._device
        )
        self._views = threading.local()  # per thread, as the scratch buffers are: (buffer, its views)

    def fits(self, members: Sequence[Tensor]) -> bool:
        """Whether ``members`` look like the ones planned for (the first and the last shape; a layout is
        kept per set of parameters, whose shapes do not change). Any other member of another shape
        makes ``cat`` raise, as its trailing dims differ from its bucket's."""
        first, last = self._members[0], self._members[-1]
        return members[first].shape == self._shapes[0] and members[last].shape == self._shapes[-1]

    def gather(self, members: Sequence[Tensor], slot: int) -> Tensor:
        base = scratch(self._numel, self._dtype, self._device, slot)
        kept: tuple[Tensor, list[Tensor]] | None = getattr(self._views, "kept", None)
        if kept is None or kept[0] is not base:  # a new scratch buffer: views of it, kept while it lasts
            kept = self._views.kept = (
                base,
                [
                    base[start:stop] if trailing is None else base[start:stop].view(-1, *trailing)
                    for start, stop, trailing in self._spans
                ],
            )
        for pick, out, (_, _, trailing) in zip(self._pickers, kept[1], self._spans, strict=True):
            if trailing is None:
                torch.stack(pick(members), out=out)
            else:
                torch.cat(pick(members), out=out)
        return base


def _back_to_back(parts: list[Tensor]) -> bool:
    """Whether ``parts`` are contiguous and follow each other without gaps in one storage."""
    first = parts[0]
    storage, size, address = first.untyped_storage().data_ptr(), first.element_size(), first.data_ptr()
    for part in parts:
        if part.data_ptr() != address or not part.is_contiguous() or part.untyped_storage().data_ptr() != storage:
            return False
        address += part.numel() * size
    return True


class Group:
    """The non-empty tensors of one (device, dtype), as chunks."""

    def __init__(
        self, device: torch.device, dtype: torch.dtype, members: list[int], numels: list[int], chunk_elements: int
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.members = members  # positions in the input list
        self.numels = numels
        plans = _plan(numels, chunk_elements)
        self.chunks = [Chunk(plan, device, numels) for plan in plans]
        segment_members = [member for plan in plans for member, _, _ in plan]
        # Members cut into several segments: their results are combined through this index.
        self._segment_members = _index(segment_members, device) if len(segment_members) > len(members) else None
        self._positions = _index(members, device)

    def tensors(self, tensors: Sequence[Tensor | None]) -> list[Tensor]:
        # Tensor | None to mypy; never None here, as the group's members are the positions whose tensor is present.
        return [tensors[position] for position in self.members]  # type: ignore[misc]

    def select(self, per_position: Tensor) -> Tensor:
        """Rows of a per-input-position tensor for this group's members, on its device."""
        return per_position.to(self.device, non_blocking=True).index_select(0, self._positions)

    def per_segment(self, per_member: Tensor) -> Tensor:
        """A per-member tensor spread over the segments (members cut into pieces repeat)."""
        return per_member if self._segment_members is None else per_member.index_select(0, self._segment_members)

    def chunk_slices(self, per_segment: Tensor) -> list[Tensor]:
        """A per-segment tensor cut into the chunks' parts."""
        return list(torch.split(per_segment, [len(chunk.pieces) for chunk in self.chunks]))

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
        self.keys = keys
        self.chunk_elements = chunk_elements
        self.derived: dict[str, Any] = {}  # plans a statistic derives from the layout, kept with it
        self.device = next((key[0] for key in keys if key is not None), torch.device("cpu"))
        by_group: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[int]]] = {}
        for position, key in enumerate(keys):
            if key is not None and key[2] > 0:
                members, numels = by_group.setdefault((key[0], key[1]), ([], []))
                members.append(position)
                numels.append(key[2])
        self.groups = [
            Group(device, dtype, members, numels, chunk_elements)
            for (device, dtype), (members, numels) in by_group.items()
        ]
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

    def _assemble(
        self, per_group: list[Tensor], fill: float, dtype: torch.dtype, one: tuple[int, ...], dim: int
    ) -> Tensor:
        parts = [part.to(self.device, non_blocking=True) for part in per_group]
        if not self.n:
            return torch.zeros(one[:dim] + (0,) + one[dim + 1 :], dtype=dtype, device=self.device)
        if self._order is None:
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
        parts.append(torch.full(one, fill, dtype=dtype, device=self.device))
        return torch.cat(parts, dim).index_select(dim, self._order)


@functools.lru_cache(maxsize=64)
def _layout(keys: tuple[_Key, ...], chunk_elements: int) -> Layout:
    return Layout(keys, chunk_elements)


def layout_of(tensors: Sequence[Tensor | None], chunk_elements: int = FLAT_CHUNK_ELEMENTS) -> Layout:
    """The cached :class:`Layout` of ``tensors`` (looked up by devices, dtypes and sizes)."""
    keys = tuple(None if t is None else (t.device, t.dtype, t.numel()) for t in tensors)
    return _layout(keys, chunk_elements)
