"""Multi-resolution rollups of every per-step series, written with the steps they summarise.

For each (run, rank, series, level, bucket) one row summarises the steps ``bucket * level``
to ``(bucket + 1) * level - 1``, per tensor for per-tensor stats: the minimum and maximum
(±Inf included, each with the first step reaching it), the first NaN, and how many values
and non-finite values the bucket holds. These summaries merge exactly, so
a batch that lands in a bucket already written (the next batch, a retry, another replica)
merges into it, and a read that wants wider buckets merges consecutive ones. A whole-run
read thus reads a few hundred rows, however long the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.store.models import Rollup
from numwatch.monitor.store.packing import compress_arrays, decompress_arrays, element, inflate

# Four times apart, so a read's level holds between a quarter of and all its row budget; 1,024 rows
# of the coarsest cover 268M steps.
LEVELS = (64, 256, 1024, 4096, 16384, 65536, 262144)
FINEST = LEVELS[0]
# Per-step scalars with a series: the step columns, then the first param group's lr and the skip flag.
STEP_SCALARS = ("loss", "global_grad_norm", "loss_scale", "new_loss_scale", "headroom_bits", "step_time")
DERIVED_SCALARS = ("lr", "skipped")
# What clipping did: step columns too, newer than the compact store's migration (which reads STEP_SCALARS);
# last, so the scalar rows' earlier columns keep their places.
CLIP_SCALARS = ("clip_coef", "post_clip_grad_norm")
SCALAR_SERIES = (*STEP_SCALARS, *DERIVED_SCALARS, *CLIP_SCALARS)
# Series that arrive together share one row per bucket, a column per series (and tensor): one
# row to merge per level and batch instead of one per series. The scalars in SCALAR_SERIES order;
# NaN/Inf counts; the format counts. Every other per-tensor stat has rows of its own.
SCALARS = "scalars"
# A rank's own health before the gradient reduction: a row of its own, only for steps that carry it.
LOCAL = "local"
LOCAL_SERIES = ("local_grad_norm", "local_nonfinite", "compute_time")
SCALAR_ROWS: dict[str, tuple[str, ...]] = {SCALARS: SCALAR_SERIES, LOCAL: LOCAL_SERIES}
ROW_GROUPS: dict[str, tuple[str, ...]] = {
    **SCALAR_ROWS,
    "nonfinite": protocol.NONFINITE_STATS,
    "format": protocol.FORMAT_COUNT_STATS,
    "gemm": protocol.GEMM_STATS,
}
_GROUP_OF = {series: (group, i) for group, members in ROW_GROUPS.items() for i, series in enumerate(members)}
_NO_STEP = np.uint32(0xFFFFFFFF)  # an offset meaning "no such step in this bucket"


def value_dtype(row_series: str) -> np.dtype:
    first = ROW_GROUPS.get(row_series, (row_series,))[0]
    return np.dtype(protocol.TENSOR_STATS.get(first, "<f8"))


def width(row_series: str, n_tensors: int) -> int:
    """Columns of a stored row: one per scalar, one per tensor and stat."""
    if row_series in SCALAR_ROWS:
        return len(SCALAR_ROWS[row_series])
    return n_tensors * len(ROW_GROUPS.get(row_series, (row_series,)))


def location(series: str, n_tensors: int) -> tuple[str, int, int]:
    """(stored row series, first column, columns) of ``series`` (a scalar, or a per-tensor stat's tensors)."""
    group, position = _GROUP_OF.get(series, (series, 0))
    if group in SCALAR_ROWS:
        return group, position, 1
    return group, position * n_tensors, n_tensors


@dataclass
class Summary:
    """One bucket of one series, per tensor (arrays of equal length); steps are absolute, -1 = none."""

    low: np.ndarray
    low_at: np.ndarray
    high: np.ndarray
    high_at: np.ndarray
    nan_at: np.ndarray
    count: np.ndarray
    nonfinite: np.ndarray


_FIELDS = ("low", "low_at", "high", "high_at", "nan_at", "count", "nonfinite")
_VALUE_FIELDS = ("low", "high")
_STEP_FIELDS = ("low_at", "high_at", "nan_at")


def _extreme(values: np.ndarray, nan: np.ndarray, steps: np.ndarray, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the extreme non-NaN value and the first step holding it (NaN, -1 without any)."""
    if values.dtype.kind == "f":
        fill = -np.inf if largest else np.inf
        key = np.where(nan, fill, values)
    else:
        key = values
    best = key.max(axis=0) if largest else key.min(axis=0)
    hit = (key == best) & ~nan
    found = hit.any(axis=0)
    at = np.where(found, steps[np.argmax(hit, axis=0)], -1)
    if values.dtype.kind == "f":
        best = np.where(found, best, np.nan).astype(values.dtype)
    return best, at


def summarize(steps: np.ndarray, values: np.ndarray, present: np.ndarray | None = None) -> Summary:
    """The summary of ``values`` (one row per step, ascending ``steps``, one column per tensor or scalar);
    ``present`` marks the values that exist (a step without a loss has none), default all."""
    floating = values.dtype.kind == "f"
    nan = np.isnan(values) if floating else np.zeros(values.shape, bool)
    if present is None:
        present = np.ones(values.shape, bool)
    nan &= present
    skip = nan | ~present
    low, low_at = _extreme(values, skip, steps, largest=False)
    high, high_at = _extreme(values, skip, steps, largest=True)
    nan_at = np.where(nan.any(axis=0), steps[np.argmax(nan, axis=0)], -1)
    count = present.sum(axis=0).astype(np.int64)
    nonfinite = (~np.isfinite(values) & present).sum(axis=0) if floating else np.zeros(values.shape[1], np.int64)
    return Summary(low, low_at, high, high_at, nan_at, count, nonfinite)


def _pick(
    a: np.ndarray, a_at: np.ndarray, b: np.ndarray, b_at: np.ndarray, better: np.ufunc
) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore"):
        take = (b_at >= 0) & ((a_at < 0) | better(b, a) | ((b == a) & (b_at < a_at)))
    return np.where(take, b, a), np.where(take, b_at, a_at)


def merge(a: Summary, b: Summary) -> Summary:
    """The summary of the union of two disjoint sets of steps."""
    low, low_at = _pick(a.low, a.low_at, b.low, b.low_at, np.less)
    high, high_at = _pick(a.high, a.high_at, b.high, b.high_at, np.greater)
    nan_at = np.where((a.nan_at >= 0) & (b.nan_at >= 0), np.minimum(a.nan_at, b.nan_at), np.maximum(a.nan_at, b.nan_at))
    return Summary(low, low_at, high, high_at, nan_at, a.count + b.count, a.nonfinite + b.nonfinite)


def encode(summary: Summary, origin: int) -> bytes:
    """Compressed bytes of ``summary``; steps as uint32 offsets from the bucket's first step ``origin``."""
    arrays = []
    for name in _FIELDS:
        values = getattr(summary, name)
        if name in _STEP_FIELDS:
            values = np.where(values >= 0, values - origin, _NO_STEP).astype("<u4")
        elif name not in _VALUE_FIELDS:
            values = values.astype("<u4")
        arrays.append((np.ascontiguousarray(values).tobytes(), values.dtype))
    # One block: split by plane, a 300-tensor row shrinks by 6% (216 bytes of 3.8 KB) at three times the time.
    return compress_arrays(arrays, blocks=False)


def decode(blob: bytes, origin: int, dtype: np.dtype, n: int) -> Summary:
    sizes = [
        (n * (dtype.itemsize if name in _VALUE_FIELDS else 4), dtype.itemsize if name in _VALUE_FIELDS else 4)
        for name in _FIELDS
    ]
    fields = {}
    for name, raw in zip(_FIELDS, decompress_arrays(blob, sizes), strict=True):
        if name in _VALUE_FIELDS:
            fields[name] = np.frombuffer(raw, dtype=dtype)
        else:
            offsets = np.frombuffer(raw, dtype="<u4")
            if name in _STEP_FIELDS:
                fields[name] = np.where(offsets == _NO_STEP, -1, offsets.astype(np.int64) + origin)
            else:
                fields[name] = offsets.astype(np.int64)
    return Summary(**fields)


def decode_column(blob: bytes, origin: int, dtype: np.dtype, n: int, index: int) -> Summary:
    """The summary of tensor ``index`` alone (what :func:`decode` gives, one column), without decoding the others."""
    shuffled, offset, fields = inflate(blob), 0, {}
    for name in _FIELDS:
        size = dtype.itemsize if name in _VALUE_FIELDS else 4
        raw = element(shuffled, offset, n, size, index)
        offset += size * n
        if name in _VALUE_FIELDS:
            fields[name] = np.frombuffer(raw, dtype=dtype)
        else:
            value = int.from_bytes(raw, "little")
            if name in _STEP_FIELDS:
                value = -1 if value == _NO_STEP else value + origin
            fields[name] = np.array([value], np.int64)
    return Summary(**fields)


def stack(summaries: list[Summary]) -> Summary:
    """Summaries of consecutive pieces as one whose fields have a row per piece."""
    return Summary(*(np.stack([getattr(s, name) for s in summaries]) for name in _FIELDS))


_NONE = np.iinfo(np.int64).max  # "no step" while taking minima of steps


def _group_extreme(
    values: np.ndarray, at: np.ndarray, starts: np.ndarray, largest: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per group of rows (``starts``) and column: the extreme value with the earliest step holding it."""
    missing = at < 0
    if values.dtype.kind == "f":
        fill = -np.inf if largest else np.inf
    else:
        fill = np.iinfo(values.dtype).min if largest else np.iinfo(values.dtype).max
    key = np.where(missing, fill, values)
    best = (np.maximum if largest else np.minimum).reduceat(key, starts, axis=0)
    sizes = np.diff(np.r_[starts, len(values)])
    hit = (key == np.repeat(best, sizes, axis=0)) & ~missing
    first = np.minimum.reduceat(np.where(hit, at, _NONE), starts, axis=0)
    found = first != _NONE
    return np.where(found, best, np.nan if values.dtype.kind == "f" else 0).astype(values.dtype), np.where(
        found, first, -1
    )


def reduce_groups(pieces: Summary, groups: np.ndarray) -> Summary:
    """Merge the rows of ``pieces`` (one per piece, in step order) sharing a value of ``groups`` (non-decreasing),
    every column at once."""
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    low, low_at = _group_extreme(pieces.low, pieces.low_at, starts, largest=False)
    high, high_at = _group_extreme(pieces.high, pieces.high_at, starts, largest=True)
    first_nan = np.minimum.reduceat(np.where(pieces.nan_at < 0, _NONE, pieces.nan_at), starts, axis=0)
    return Summary(
        low,
        low_at,
        high,
        high_at,
        np.where(first_nan == _NONE, -1, first_nan),
        np.add.reduceat(pieces.count, starts, axis=0),
        np.add.reduceat(pieces.nonfinite, starts, axis=0),
    )


def columns_of(summary: Summary, first: int, count: int) -> Summary:
    return Summary(*(getattr(summary, name)[first : first + count] for name in _FIELDS))


def row(summary: Summary, index: int) -> Summary:
    return Summary(*(getattr(summary, name)[index] for name in _FIELDS))


def _lr(encoded: list[float | str | None] | None) -> float | None:
    return protocol.decode_float(encoded[0]) if encoded else None


def step_series(
    views: list[dict[str, Any]], n_tensors: int, scalars: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Stored row series -> (steps, values[steps, columns], present or None when all are) of ``views`` (ascending)."""
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    if views and scalars:
        rows = [
            [
                _lr(view["lr"]) if name == "lr" else float(view["skipped"]) if name == "skipped" else view.get(name)
                for name in SCALAR_SERIES
            ]
            for view in views
        ]
        present = np.array([[value is not None for value in row] for row in rows])
        values = np.array([[np.nan if value is None else value for value in row] for row in rows], np.float64)
        out[SCALARS] = (np.array([view["step"] for view in views], np.int64), values, present)
    local = [view for view in views if view.get("local_grad_norm") is not None] if scalars else []
    if local:
        rows = [[view.get(name) for name in LOCAL_SERIES] for view in local]
        present = np.array([[value is not None for value in row] for row in rows])
        values = np.array([[np.nan if value is None else value for value in row] for row in rows], np.float64)
        out[LOCAL] = (np.array([view["step"] for view in local], np.int64), values, present)
    stats = [name for name in protocol.TENSOR_STATS if name not in _GROUP_OF]
    for row_series, members in [
        *((name, (name,)) for name in stats),
        *((g, m) for g, m in ROW_GROUPS.items() if g not in SCALAR_ROWS),
    ]:
        having = [view for view in views if any(name in view["tensors"] for name in members)]
        if not having:
            continue
        dtype = value_dtype(row_series)
        values = np.zeros((len(having), len(members) * n_tensors), dtype)
        present = np.zeros(values.shape, bool)
        for i, view in enumerate(having):
            for k, name in enumerate(members):
                if name in view["tensors"]:
                    values[i, k * n_tensors : (k + 1) * n_tensors] = view["tensors"][name]
                    present[i, k * n_tensors : (k + 1) * n_tensors] = True
        out[row_series] = (
            np.array([view["step"] for view in having], np.int64),
            values,
            None if present.all() else present,
        )
    return out


def _finest(series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> dict[tuple[str, int], Summary]:
    """(series, finest bucket) -> summary of the new steps in it."""
    fresh: dict[tuple[str, int], Summary] = {}
    for name, (steps, values, present) in series.items():
        buckets = steps // FINEST
        for chunk in np.split(np.arange(len(steps)), np.flatnonzero(np.diff(buckets)) + 1):
            fresh[(name, int(buckets[chunk[0]]))] = summarize(
                steps[chunk], values[chunk], None if present is None else present[chunk]
            )
    return fresh


def _row(run_id: int, rank: int, name: str, level: int, bucket: int, summary: Summary) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "rank": rank,
        "series": name,
        "level": level,
        "bucket": bucket,
        "data": encode(summary, bucket * level),
    }


def _fold(
    session: Session, run_id: int, rank: int, name: str, level: int, bucket: int, n_tensors: int
) -> Summary | None:
    """The summary of a complete bucket from the finer levels' rows (None when it holds no value)."""
    dtype, n = value_dtype(name), width(name, n_tensors)
    finer = LEVELS[LEVELS.index(level) - 1]
    ratio = level // finer
    parts = [
        s
        for _, _, s in cover(
            session,
            run_id,
            rank,
            name,
            finer,
            bucket * ratio,
            bucket * ratio + ratio - 1,
            lambda blob, origin: decode(blob, origin, dtype, n),
        )
    ]
    if not parts:
        return None
    merged = parts[0]
    for part in parts[1:]:
        merged = merge(merged, part)
    return merged


def _series_in(session: Session, run_id: int, rank: int, level: int, bucket: int) -> list[str]:
    """The row series having values in a bucket of ``level`` (from the finest level, complete by construction)."""
    ratio = level // FINEST
    return list(
        session.execute(
            select(Rollup.series)
            .distinct()
            .where(
                Rollup.run_id == run_id,
                Rollup.rank == rank,
                Rollup.level == FINEST,
                Rollup.bucket.between(bucket * ratio, bucket * ratio + ratio - 1),
            )
        ).scalars()
    )


def record(
    session: Session,
    run_id: int,
    rank: int,
    views: list[dict[str, Any]],
    n_tensors: int,
    previous_last: int,
    scalars: bool = True,
) -> None:
    """Summarise the newly stored steps ``views`` (ascending; ``previous_last``: the rank's highest step before them);
    ``scalars=False``: their per-tensor stats only (stats added to steps stored before).

    The finest level is merged with every batch. A coarser bucket is written once complete (the rank has
    a step at or past its end), folded from the finer level's rows, and merged into when a late step
    lands in it: a batch touches two or three rows per series, and the coarse rows are written once, not
    with every batch. Reads cover a bucket that has no row (not complete, or older than its level) with
    the finer levels' rows.
    """
    fresh = _finest(step_series(views, n_tensors, scalars))
    if not fresh:
        return
    last = max(previous_last, max(view["step"] for view in views))
    keys = {(name, FINEST, bucket) for name, bucket in fresh}
    for level in LEVELS[1:]:
        keys |= {(name, level, bucket * FINEST // level) for name, bucket in fresh}
    key = tuple_(Rollup.series, Rollup.level, Rollup.bucket)
    stored = {
        (row.series, row.level, row.bucket): bytes(row.data)
        for row in session.execute(
            select(Rollup.series, Rollup.level, Rollup.bucket, Rollup.data).where(
                Rollup.run_id == run_id, Rollup.rank == rank, key.in_(list(keys))
            )
        )
    }
    table = Rollup.__table__
    for level in LEVELS:
        updates, inserts = [], []
        fresh_here: dict[tuple[str, int], list[Summary]] = {}
        for (name, bucket), summary in fresh.items():
            fresh_here.setdefault((name, bucket * FINEST // level), []).append(summary)
        for (name, bucket), summaries in fresh_here.items():
            origin = bucket * level
            blob = stored.get((name, level, bucket))
            if blob is not None:
                merged = decode(blob, origin, value_dtype(name), width(name, n_tensors))
                for summary in summaries:
                    merged = merge(merged, summary)
                updates.append(_row(run_id, rank, name, level, bucket, merged))
            elif level == FINEST:
                inserts.append(_row(run_id, rank, name, level, bucket, summaries[0]))
            elif (
                origin + level - 1 <= previous_last
                and (folded := _fold(session, run_id, rank, name, level, bucket, n_tensors)) is not None
            ):
                inserts.append(
                    _row(run_id, rank, name, level, bucket, folded)
                )  # complete before, no row of this series yet
        if level > FINEST:
            # Buckets this batch completes: the one holding the rank's previous last step (its older steps)
            # and those holding new steps; buckets in between hold no step.
            done = {
                b
                for b in {previous_last // level, *(bucket for _, bucket in fresh_here)}
                if previous_last < b * level + level - 1 <= last
            }
            for bucket in sorted(done):
                for name in _series_in(session, run_id, rank, level, bucket):
                    if (name, level, bucket) not in stored and (
                        folded := _fold(session, run_id, rank, name, level, bucket, n_tensors)
                    ) is not None:
                        inserts.append(_row(run_id, rank, name, level, bucket, folded))
        if updates:
            session.execute(
                update(table)
                .where(
                    table.c.run_id == bindparam("b_run"),
                    table.c.rank == bindparam("b_rank"),
                    table.c.series == bindparam("b_series"),
                    table.c.level == bindparam("b_level"),
                    table.c.bucket == bindparam("b_bucket"),
                )
                .values(data=bindparam("data")),
                [
                    {
                        "b_run": r["run_id"],
                        "b_rank": r["rank"],
                        "b_series": r["series"],
                        "b_level": r["level"],
                        "b_bucket": r["bucket"],
                        "data": r["data"],
                    }
                    for r in updates
                ],
            )
        if inserts:
            session.execute(table.insert(), inserts)


def cover(
    session: Session,
    run_id: int,
    rank: int,
    row_series: str,
    level: int,
    first: int,
    last: int,
    decoder: Callable[[bytes, int], Summary],
) -> list[tuple[int, int, Summary]]:
    """``(level, bucket, summary)`` of the stored rows that together hold buckets ``first..last`` of ``level``,
    ascending.

    A bucket without a row (incomplete, written before its level existed, or empty) is covered by the
    next finer level's rows, and so on down to the finest, which every step is written to."""
    rows = session.execute(
        select(Rollup.bucket, Rollup.data)
        .where(
            Rollup.run_id == run_id,
            Rollup.rank == rank,
            Rollup.series == row_series,
            Rollup.level == level,
            Rollup.bucket.between(first, last),
        )
        .order_by(Rollup.bucket)
    ).all()
    finer = LEVELS[LEVELS.index(level) - 1] if level > FINEST else None
    out: list[tuple[int, int, Summary]] = []
    expected = first
    for bucket, data in [*rows, (last + 1, None)]:
        if bucket > expected and finer is not None:
            ratio = level // finer
            out += cover(session, run_id, rank, row_series, finer, expected * ratio, bucket * ratio - 1, decoder)
        if data is not None:
            out.append((level, bucket, decoder(bytes(data), bucket * level)))
        expected = bucket + 1
    return out


def read_range(
    session: Session,
    run_id: int,
    rank: int,
    series: str,
    level: int,
    first: int,
    last: int,
    n_tensors: int,
    column: int | None,
) -> list[tuple[int, int, Summary]]:
    """:func:`cover` of ``series``: one tensor's column if given, else every tensor's (a scalar's own column)."""
    row_series, start, columns = location(series, n_tensors)
    dtype, n = value_dtype(row_series), width(row_series, n_tensors)
    one = column is not None or columns == 1

    def decoder(blob: bytes, origin: int) -> Summary:
        if one:  # decode that column alone
            return decode_column(blob, origin, dtype, n, start + (column or 0))
        return columns_of(decode(blob, origin, dtype, n), start, columns)

    return cover(session, run_id, rank, row_series, level, first, last, decoder)
