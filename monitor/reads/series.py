"""Series and heatmap reads of bounded cost: raw steps for short windows, rollups for long ones.

A window of steps ``low..high`` is answered in buckets of ``width`` steps aligned at
multiples of it. Each bucket keeps its minimum and its maximum (±Inf included, at the
first step reaching them) and its first NaN, so every spike and every non-finite value
of the window shows, whatever the zoom. Short windows (at most ``RAW_SPAN`` steps) read
the raw rows; longer ones choose the finest rollup level reading at most ``ROWS_PER_BUCKET``
rows per bucket answered and merge consecutive buckets; the window's ragged edges come from finer levels and
the raw rows, so the answer is exactly the raw rows' answer for the same width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store import rollups

RAW_SPAN = 1024
# Scalar series made from a step's fields: the first param group's lr, the skip flag as 0 or 1.
DERIVED: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "lr": lambda step: protocol.decode_float(step["lr"][0]) if step["lr"] else None,
    "skipped": lambda step: float(step["skipped"]),
}
# Rollup rows a read may decode per bucket it answers: with levels four apart, a whole-run read
# decodes between half and twice as many rows as it returns buckets.
ROWS_PER_BUCKET = 2


def bucket_width(low: int, high: int, buckets: int, unit: int = 1) -> int:
    """The smallest multiple of ``unit`` whose aligned buckets split ``low..high`` into at most ``buckets``."""
    if buckets < 2:
        return unit * (high // unit + 1)
    width = unit * max(1, math.ceil((high - low + 1) / (unit * (buckets - 1))))
    while width > unit and high // (width - unit) - low // (width - unit) + 1 <= buckets:
        width -= unit  # the ceiling above may overshoot by a unit or two
    return width


def summary_points(summary: rollups.Summary) -> list[tuple[int, float]]:
    """A bucket's kept points in step order: its minimum, maximum and first NaN (one column)."""
    points = {}
    if summary.nan_at[0] >= 0:
        points[int(summary.nan_at[0])] = math.nan
    for at, value in ((summary.low_at[0], summary.low[0]), (summary.high_at[0], summary.high[0])):
        if at >= 0:
            points[int(at)] = float(value)
    return sorted(points.items())


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Every point when at most ``max_points``, else each bucket's kept points (ascending ``steps``)."""
    if len(steps) <= max_points:
        return steps, values
    rows = list(zip(steps.tolist(), values.reshape(-1, 1), strict=True))
    points = [
        p
        for _, summary in raw_buckets(
            rows, int(steps[0]), bucket_width(int(steps[0]), int(steps[-1]), max(1, max_points // 3))
        )
        for p in summary_points(summary)
    ]
    return np.array([p[0] for p in points], np.int64), np.array([p[1] for p in points], np.float64)


def raw_values(
    reader: step_blocks.Reader, name: str, low: int, high: int, column: int | None
) -> Iterator[tuple[int, np.ndarray]]:
    """(step, values) of the stored steps ``low..high`` having ``name``, streamed; one tensor's value if ``column``."""
    if name in protocol.TENSOR_STATS:
        for step in reader.range(low, high, wanted=(name,), having=(name,)):
            values = step["tensors"].get(name)
            if values is not None:
                yield step["step"], (values[column : column + 1] if column is not None else values)
        return
    # A step without a skip has no "skipped" name: every block holds the skip series.
    for step in reader.range(low, high, wanted=(), having=() if name == "skipped" else (name,)):
        value = DERIVED[name](step) if name in DERIVED else step[name]
        if value is not None:
            yield step["step"], np.array([value], np.float64)


def choose_level(low: int, high: int, buckets: int) -> int:
    """The finest rollup level covering ``low..high`` in at most ``ROWS_PER_BUCKET * buckets`` rows
    (else the coarsest)."""
    budget = ROWS_PER_BUCKET * max(1, buckets)
    return next((level for level in rollups.LEVELS if high // level - low // level + 1 <= budget), rollups.LEVELS[-1])


def pieces(low: int, high: int, top: int) -> list[tuple[int, int, int]]:
    """``low..high`` as aligned rollup buckets of levels up to ``top`` and raw runs: ``(level or 1, first, last)``."""
    levels = [level for level in reversed(rollups.LEVELS) if level <= top]
    out: list[tuple[int, int, int]] = []
    at = low
    while at <= high:
        level = next((lv for lv in levels if at % lv == 0 and at + lv - 1 <= high), None)
        if level is None:  # inside the finest level's bucket: raw steps up to its end
            last = min(high, (at // levels[-1] + 1) * levels[-1] - 1)
            out.append((1, at, last))
            at = last + 1
        else:
            out.append((level, at, at + level - 1))
            at += level
    return out


def _runs(parts: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Consecutive rollup pieces of one level joined (raw pieces stay within their finest bucket)."""
    out: list[tuple[int, int, int]] = []
    for part in parts:
        if out and part[0] > 1 and out[-1][0] == part[0] and out[-1][2] + 1 == part[1]:
            out[-1] = (part[0], out[-1][1], part[2])
        else:
            out.append(part)
    return out


def bucket_summaries(
    reader: step_blocks.Reader, name: str, low: int, high: int, width: int, level: int, column: int | None
) -> Iterator[tuple[int, rollups.Summary]]:
    """(first step, summary) of each ``width``-step bucket of ``low..high`` holding values, from rollups
    up to ``level``."""
    found: list[tuple[int, rollups.Summary]] = []
    for part_level, first, last in _runs(pieces(low, high, level)):
        if part_level == 1:
            rows = list(raw_values(reader, name, first, last, column))
            if rows:
                found.append(
                    (first, rollups.summarize(np.array([r[0] for r in rows], np.int64), np.stack([r[1] for r in rows])))
                )
        else:
            pieces_found = rollups.read_range(
                reader.session,
                reader.run_id,
                reader.rank,
                name,
                part_level,
                first // part_level,
                last // part_level,
                reader.n_tensors,
                column,
            )
            found += [(piece_level * bucket, summary) for piece_level, bucket, summary in pieces_found]
    if not found:
        return
    groups = np.array([first for first, _ in found], np.int64) // width
    merged = rollups.reduce_groups(rollups.stack([summary for _, summary in found]), groups)
    for index, bucket in enumerate(np.unique(groups).tolist()):
        yield max(low, bucket * width), rollups.row(merged, index)


def raw_buckets(rows: list[tuple[int, np.ndarray]], low: int, width: int) -> list[tuple[int, rollups.Summary]]:
    """(first step, summary) of each ``width``-step bucket of the raw ``rows`` (ascending)."""
    steps = np.array([row[0] for row in rows], np.int64)
    out = []
    for chunk in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(steps // width)) + 1):
        if chunk.size:
            first = max(low, int(steps[chunk[0]]) // width * width)
            out.append((first, rollups.summarize(steps[chunk], np.stack([rows[i][1] for i in chunk]))))
    return out


def read_window(
    session: Session,
    run_id: int,
    rank: int,
    name: str,
    start: int | None,
    end: int | None,
    limit: int,
    buckets: int,
    n_tensors: int,
    column: int | None,
) -> tuple[list[tuple[int, np.ndarray]], list[tuple[int, rollups.Summary]]]:
    """``(rows, [])``: every (step, values) of the window when it holds at most ``limit``; else ``([], summaries)``:
    at most ``buckets`` (first step, summary) pairs, from the raw rows when the window is short, else from rollups."""
    reader = step_blocks.Reader(session, run_id, rank, n_tensors)
    window = reader.extent(start, end)
    if window is None:
        return [], []
    low, high = window
    if high - low + 1 <= RAW_SPAN:
        rows = list(raw_values(reader, name, low, high, column))
        if len(rows) <= limit:
            return rows, []
        return [], raw_buckets(rows, low, bucket_width(low, high, buckets))
    level = choose_level(low, high, buckets)
    return [], list(bucket_summaries(reader, name, low, high, bucket_width(low, high, buckets, level), level, column))
