"""Stored steps, several to a row: each batch's new steps of one (run, rank) as one or more blocks.

A 300-tensor step's arrays (600 float32 norms with random mantissas) compress to about 2 KB.
Stored a row per step, each step also pays a row's and an index entry's overhead, and on
PostgreSQL a page holds only three such rows (a quarter of it left empty). A block of up to
``MAX_STEPS`` steps is one row whose arrays go out of line in full pages.

A block holds:

- ``header``: zlib-compressed JSON: per step its scalars (floats as the protocol encodes
  them, absent ones left out) and ``stats``, the names of its arrays in ``TENSOR_STATS``
  order (``name=0``: all zero, stored as nothing); then the byte length of each segment.
- ``arrays`` and ``sampled``: one compressed segment per array name (``numwatch.monitor.store.packing``):
  the arrays of every step having it, in step order; the stats measured at every step in
  ``arrays``, the sampled ones (format counts, optimizer health, quantization, activations)
  in ``sampled``, so a read of sampled stats fetches a few KB, not the whole block. A read
  inflates only the segments it wants.
- ``names``: ``,name,...,`` of every array and scalar some step of the block has, so reads
  pick the blocks holding a series with a LIKE.

A block's steps span at most ``MAX_SPAN`` step numbers, so the blocks holding a step or a
range are found by an index range on ``first_step``. Blocks of one (run, rank) never share a
step (a batch stores only steps not stored before), but their ranges may interleave when
steps arrive out of order; reads merge them in step order.
"""

from __future__ import annotations

import heapq
import itertools
import json
import zlib
from collections.abc import Collection, Generator, Iterable
from typing import Any

import numpy as np
from sqlalchemy import Select, case, func, insert, or_, select, update
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.store.models import StepBlock
from numwatch.monitor.store.packing import ZERO_SUFFIX, compress_arrays, decompress_arrays, zero_mark

MAX_STEPS = 256
MAX_SPAN = 1024
# Per step: what the store keeps besides the arrays (None: left out of the header).
FLOAT_FIELDS = (
    "time",
    "step_time",
    "loss",
    "loss_scale",
    "new_loss_scale",
    "global_grad_norm",
    "headroom_bits",
    "clip_coef",
    "post_clip_grad_norm",
)
OTHER_FIELDS = ("scale_decision", "skipped", "clipped", "lr", "scalars")
# A rank's own health before the gradient reduction (protocol 4 ``step.local``), kept when present.
LOCAL_FLOATS = ("local_grad_norm", "compute_time")
LOCAL_OTHERS = ("local_nonfinite", "nonfinite_tensors", "checksum", "replicated_by")
LOCAL_FIELDS = (*LOCAL_FLOATS, *LOCAL_OTHERS)
# Array names besides the per-tensor stats: the traced modules' activations (one value per module).
ACTIVATION_ARRAYS = {f"activation_{name}": dtype for name, dtype in protocol.ACTIVATION_STATS.items()}
ARRAY_DTYPES: dict[str, str] = {**protocol.TENSOR_STATS, **ACTIVATION_ARRAYS}
ALL = None  # decode every array
COLUMNS = ("arrays", "sampled")


def _column(name: str) -> str:
    """The column holding an array's segment: ``arrays`` for the stats of every step, else ``sampled``."""
    return "arrays" if name in protocol.EVERY_STEP_STATS else "sampled"


def needed(wanted: Collection[str] | None) -> list[str]:
    """The array columns a read of ``wanted`` (ALL: every array) fetches."""
    return list(COLUMNS) if wanted is ALL else sorted({_column(name) for name in wanted})


def _length(name: str, n_tensors: int, n_modules: int) -> int:
    return n_modules if name in ACTIVATION_ARRAYS else n_tensors


def _raw(step: dict[str, Any], name: str) -> bytes | None:
    if name in ACTIVATION_ARRAYS:
        return step.get(name)
    values = step["tensors"].get(name)
    return None if values is None else np.ascontiguousarray(values, ARRAY_DTYPES[name]).tobytes()


def encode(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of one block (``run_id`` and ``rank`` aside) of ``steps``, ascending and within ``MAX_SPAN``:
    each as :func:`decode` gives them (the fields above, ``tensors``: name -> array, activations as raw bytes)."""
    header_steps: list[dict[str, Any]] = []
    segments: dict[str, list[bytes]] = {}
    names: set[str] = set()
    for step in steps:
        entry: dict[str, Any] = {"step": step["step"]}
        for key in FLOAT_FIELDS:
            if step.get(key) is not None:
                entry[key] = protocol.encode_float(step[key])
        for key in OTHER_FIELDS:
            if step.get(key):
                entry[key] = step[key]
        for key in LOCAL_FIELDS:
            if step.get(key) is not None:
                entry[key] = protocol.encode_float(step[key]) if key in LOCAL_FLOATS else step[key]
        marks = []
        for name in ARRAY_DTYPES:
            raw = _raw(step, name)
            if raw is None:
                continue
            marks.append(zero_mark(name, raw))
            if marks[-1] == name:
                segments.setdefault(name, []).append(raw)
        entry["stats"] = ",".join(marks)
        names.update(key for key in entry if key not in ("step", "stats"))
        names.update(mark.removesuffix(ZERO_SUFFIX) for mark in marks)
        header_steps.append(entry)
    blobs = [
        (name, compress_arrays([(b"".join(parts), np.dtype(ARRAY_DTYPES[name]))])) for name, parts in segments.items()
    ]
    header = {"steps": header_steps, "segments": [[name, len(blob)] for name, blob in blobs]}
    columns = {column: b"".join(blob for name, blob in blobs if _column(name) == column) for column in COLUMNS}
    numbers = [step["step"] for step in steps]
    return {
        "first_step": numbers[0],
        "last_step": numbers[-1],
        "count": len(numbers),
        "names": "," + ",".join(sorted(names)) + ",",
        "header": zlib.compress(json.dumps(header, separators=(",", ":")).encode()),
        **columns,
    }


def blocks_of(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``steps`` (ascending, distinct) as the blocks to store: at most ``MAX_STEPS`` each, within ``MAX_SPAN``."""
    out: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    for step in steps:
        if current and (len(current) == MAX_STEPS or step["step"] - current[0]["step"] >= MAX_SPAN):
            out.append(encode(current))
            current = []
        current.append(step)
    if current:
        out.append(encode(current))
    return out


def decode(
    header: bytes, columns: dict[str, bytes], n_tensors: int, n_modules: int, wanted: Collection[str] | None = ALL
) -> list[dict[str, Any]]:
    """The steps of a block: each its fields (None where absent), ``stats`` (the names of its arrays) and
    ``tensors`` (name -> array) of the ``wanted`` arrays it has (all by default), activations as raw bytes.
    ``columns``: the block's ``arrays`` and ``sampled`` (those :func:`needed` for ``wanted``)."""
    document = json.loads(zlib.decompress(header))
    offsets, at = {}, dict.fromkeys(COLUMNS, 0)
    for name, size in document["segments"]:
        column = _column(name)
        offsets[name] = (column, at[column], size)
        at[column] += size
    steps = []
    for entry in document["steps"]:
        step = {"step": entry["step"], **{key: protocol.decode_float(entry.get(key)) for key in FLOAT_FIELDS}}
        step.update(
            scale_decision=entry.get("scale_decision"),
            skipped=entry.get("skipped", False),
            clipped=entry.get("clipped", False),
            lr=entry.get("lr", []),
            scalars=entry.get("scalars", {}),
            tensors={},
        )
        step.update({key: entry.get(key) for key in LOCAL_OTHERS})
        step.update({key: protocol.decode_float(entry.get(key)) for key in LOCAL_FLOATS})
        step["marks"] = [mark for mark in entry["stats"].split(",") if mark]
        step["stats"] = [mark.removesuffix(ZERO_SUFFIX) for mark in step["marks"]]
        steps.append(step)
    for name, (column, offset, size) in offsets.items():
        if wanted is not ALL and name not in wanted:
            continue
        arrays = columns[column]
        having = [step for step in steps if name in step["marks"]]
        dtype = np.dtype(ARRAY_DTYPES[name])
        length = _length(name, n_tensors, n_modules)
        (raw,) = decompress_arrays(
            arrays[offset : offset + size], [(dtype.itemsize * length * len(having), dtype.itemsize)]
        )
        values = np.frombuffer(raw, dtype=dtype).reshape(len(having), length)
        for step, row in zip(having, values, strict=True):
            step["tensors"][name] = row
    for step in steps:
        for mark in step.pop("marks"):
            name = mark.removesuffix(ZERO_SUFFIX)
            if mark.endswith(ZERO_SUFFIX) and (wanted is ALL or name in wanted):
                step["tensors"][name] = np.zeros(_length(name, n_tensors, n_modules), ARRAY_DTYPES[name])
        for name in ACTIVATION_ARRAYS:
            step[name] = step["tensors"].pop(name).tobytes() if name in step["tensors"] else None
    return steps


class Reader:
    """The stored steps of one (run, rank): found through the blocks' step ranges, decoded as needed."""

    def __init__(self, session: Session, run_id: int, rank: int, n_tensors: int, n_modules: int = 0) -> None:
        self.session, self.run_id, self.rank = session, run_id, rank
        self.n_tensors, self.n_modules = n_tensors, n_modules

    def _blocks(
        self,
        blocks: Select[int],
        having: Iterable[str],
        wanted: Collection[str] | None,
        key: Any = StepBlock.first_step,
    ) -> Generator[tuple[int, list[dict[str, Any]]], None, None]:
        """(``key``, decoded steps) of the blocks ``blocks`` selects, streamed."""
        fetched = needed(wanted)
        query = blocks.with_only_columns(
            key.label("key"), StepBlock.header, *(getattr(StepBlock, column) for column in fetched)
        ).where(StepBlock.run_id == self.run_id, StepBlock.rank == self.rank)
        names = list(having)
        if names:
            query = query.where(or_(*(StepBlock.names.contains(f",{name},", autoescape=True) for name in names)))
        rows = self.session.execute(query.execution_options(yield_per=16))
        try:
            for row in rows:
                columns = {column: bytes(getattr(row, column)) for column in fetched}
                yield row.key, decode(row.header, columns, self.n_tensors, self.n_modules, wanted)
        finally:
            rows.close()

    def range(
        self,
        low: int | None = None,
        high: int | None = None,
        wanted: Collection[str] | None = ALL,
        having: Iterable[str] = (),
    ) -> Generator[dict[str, Any], None, None]:
        """The stored steps ``low..high`` (None: unbounded) in step order, streamed; ``having``: only from
        blocks holding one of these names (a step of such a block may still lack them)."""
        pending: list[tuple[int, int, dict[str, Any]]] = []
        for order, (first, steps) in enumerate(
            self._blocks(_overlapping(low, high).order_by(StepBlock.first_step), having, wanted)
        ):
            while pending and pending[0][0] < first:  # every later block starts at or after ``first``
                yield heapq.heappop(pending)[2]
            for step in steps:
                if (low is None or step["step"] >= low) and (high is None or step["step"] <= high):
                    heapq.heappush(pending, (step["step"], order, step))
        while pending:
            yield heapq.heappop(pending)[2]

    def before(
        self, before: int | None = None, wanted: Collection[str] | None = ALL, having: Iterable[str] = ()
    ) -> Generator[dict[str, Any], None, None]:
        """The stored steps below ``before`` (None: all), latest first, streamed."""
        pending: list[tuple[int, int, dict[str, Any]]] = []
        blocks = self._blocks(_before(before).order_by(StepBlock.last_step.desc()), having, wanted, StepBlock.last_step)
        for order, (last, steps) in enumerate(blocks):
            while pending and -pending[0][0] > last:  # every later block ends at or below ``last``
                yield heapq.heappop(pending)[2]
            for step in steps:
                if before is None or step["step"] < before:
                    heapq.heappush(pending, (-step["step"], order, step))
        while pending:
            yield heapq.heappop(pending)[2]

    def last(
        self, before: int | None, count: int, wanted: Collection[str] | None = ALL, full: int = 0
    ) -> list[dict[str, Any]]:
        """The last ``count`` stored steps below ``before``, ascending, with the ``wanted`` arrays; the latest
        ``full`` of them with every array (a batch's detectors want a few steps whole and more steps' scalars).

        Read in one query (each batch reads a rank's last steps, and a cursor streaming them costs a round
        trip per fetch): the latest blocks whose counts reach ``count``. Those hold the answer unless
        blocks interleave (steps that arrived out of order); that case streams :meth:`before` instead."""
        if count <= 0:
            return []
        latest = StepBlock.last_step.desc()
        listed = (
            _before(before)
            .with_only_columns(
                StepBlock.last_step,
                StepBlock.count,
                func.sum(StepBlock.count).over(order_by=latest).label("through"),
                StepBlock.header,
                *(getattr(StepBlock, column) for column in COLUMNS),
            )
            .where(StepBlock.run_id == self.run_id, StepBlock.rank == self.rank)
            .order_by(latest)
            .limit(count + 1)
            .subquery()
        )
        earlier = listed.c.through - listed.c["count"]  # the steps of the blocks before it
        partial = needed(wanted)
        rows = self.session.execute(
            select(
                listed.c.last_step,
                earlier < full,
                case((earlier < count, listed.c.header)),
                *(case((earlier < (count if column in partial else full), listed.c[column])) for column in COLUMNS),
            ).order_by(listed.c.last_step.desc())
        ).all()
        steps: list[dict[str, Any]] = []
        whole: set[int] = set()  # the steps read with every array
        unread = None  # the highest last step of a block not read
        for last, every, header, *columns in rows:
            if header is None:
                unread = last
                break
            data = {column: bytes(value) for column, value in zip(COLUMNS, columns, strict=True) if value is not None}
            block = decode(header, data, self.n_tensors, self.n_modules, ALL if every else wanted)
            steps += [step for step in block if before is None or step["step"] < before]
            whole.update(step["step"] for step in block if every)
        steps.sort(key=lambda step: step["step"], reverse=True)
        if (unread is not None and (len(steps) < count or steps[count - 1]["step"] < unread)) or any(
            step["step"] not in whole for step in steps[: min(full, count)]
        ):
            return list(itertools.islice(self.before(before, ALL if full else wanted), count))[::-1]
        return steps[:count][::-1]

    def find(self, number: int, wanted: Collection[str] | None = ALL) -> dict[str, Any] | None:
        """Stored step ``number``, or None."""
        return _first(self.range(number, number, wanted))

    def replace(self, replacements: dict[int, dict[str, Any]]) -> None:
        """Overwrite stored steps (number -> the step as :func:`encode` takes it): their blocks are rewritten."""
        if not replacements:
            return
        blocks = list(
            self._blocks(_overlapping(min(replacements), max(replacements)), (), ALL)
        )  # read all before writing
        for first, steps in blocks:
            if any(step["step"] in replacements for step in steps):
                block = encode([replacements.get(step["step"], step) for step in steps])
                self.session.execute(
                    update(StepBlock)
                    .where(StepBlock.run_id == self.run_id, StepBlock.rank == self.rank, StepBlock.first_step == first)
                    .values(
                        names=block["names"], header=block["header"], **{column: block[column] for column in COLUMNS}
                    )
                )

    def extent(self, start: int | None = None, end: int | None = None) -> tuple[int, int] | None:
        """The first and last stored step within ``start..end`` (None: open), or None when none is."""
        first = _first(self.range(start, end, wanted=()))
        if first is None:
            return None
        last = _first(self.before(None if end is None else end + 1, wanted=()))
        assert last is not None  # the step found first is one
        return first["step"], last["step"]


def _overlapping(low: int | None, high: int | None) -> Select[int]:
    """The blocks that may hold steps ``low..high`` (None: unbounded): a range of the first-step index."""
    query = select(StepBlock.first_step)
    if low is not None:
        query = query.where(StepBlock.first_step > low - MAX_SPAN, StepBlock.last_step >= low)
    if high is not None:
        query = query.where(StepBlock.first_step <= high)
    return query


def _before(before: int | None) -> Select[int]:
    """The blocks that may hold steps below ``before`` (None: every block)."""
    query = select(StepBlock.first_step)
    if before is not None:
        # The bound on last_step is implied by the one on first_step; stated, it lets the database walk
        # the last_step index in order instead of sorting every earlier block.
        query = query.where(StepBlock.first_step < before, StepBlock.last_step < before + MAX_SPAN)
    return query


def _first(steps: Generator[dict[str, Any], None, None]) -> dict[str, Any] | None:
    """The first of ``steps``, closing the stream (and its cursor) at once."""
    try:
        return next(steps, None)
    finally:
        steps.close()


def run_last_step(session: Session, run_id: int) -> int:
    """The highest step any rank of the run stored (0 before the first)."""
    return session.execute(select(func.max(StepBlock.last_step)).where(StepBlock.run_id == run_id)).scalar() or 0


def store(session: Session, run_id: int, rank: int, steps: list[dict[str, Any]]) -> None:
    """Insert ``steps`` (ascending, none stored before) as new blocks."""
    if steps:
        session.execute(insert(StepBlock), [{"run_id": run_id, "rank": rank, **block} for block in blocks_of(steps)])
