"""Reads for the run page that the generic read API lacks: whole-model shares per step,
the steps that have histograms, and the live tail (what a page polls for)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.reads.queries import event_record, rank_states, run_status
from numwatch.monitor.reads.series import downsample
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store.models import Event, Histogram, Run

MEAN_STATS = protocol.UPDATE_STATS
ORIGIN_KINDS = ("nonfinite_origin", "nonfinite_grad")
TAIL_SCALARS = (
    "loss",
    "global_grad_norm",
    "post_clip_grad_norm",
    "clip_coef",
    "loss_scale",
    "headroom_bits",
    "step_time",
)
TAIL_LIMIT = 2000


def _series(steps: list[int], values: list[float], max_points: int) -> dict[str, list]:
    step_array, value_array = downsample(
        np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64), max_points
    )
    return {"steps": step_array.tolist(), "values": [protocol.encode_float(v) for v in value_array.tolist()]}


def tensor_summary(session: Session, run: Run, rank: int, max_points: int) -> dict[str, dict[str, list]]:
    """Per step, over all tensors: the share of gradient elements per format-count outcome
    (zeros, underflow, subnormal, overflow of the cast to the run's format) and the mean of
    the sampled ``update_ratio`` and ``stale_fraction``; each downsampled keeping extremes."""
    numel = np.array([math.prod(t["shape"]) for t in run.tensors], dtype=np.float64)
    total = float(numel.sum())
    wanted = (*protocol.FORMAT_COUNT_STATS, *MEAN_STATS)
    columns: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in wanted}
    reader = step_blocks.Reader(session, run.id, rank, len(run.tensors))
    for step in reader.range(wanted=wanted, having=wanted):
        stats = step["tensors"]
        for name in wanted:
            if name not in stats:
                continue
            values = stats[name].astype(np.float64)
            if name in MEAN_STATS:
                finite = values[np.isfinite(values)]
                value = float(finite.mean()) if finite.size else math.nan
            elif total > 0:
                value = float(values.sum()) / total
            else:
                continue
            columns[name][0].append(step["step"])
            columns[name][1].append(value)
    return {name: _series(steps, values, max_points) for name, (steps, values) in columns.items()}


def histogram_steps(session: Session, run: Run, kind: str, rank: int) -> dict[str, Any]:
    """The sampled steps with a ``kind`` histogram, and the one to show first: the tensor named
    first where values went non-finite, at the last sampled step before that (else the latest)."""
    query = (
        select(Histogram.step)
        .where(Histogram.run_id == run.id, Histogram.rank == rank, Histogram.kind == kind)
        .order_by(Histogram.step)
    )
    steps = list(session.execute(query).scalars())
    names = [t["name"] for t in run.tensors]
    if not steps or not names:
        return {"kind": kind, "rank": rank, "steps": steps, "suggested": None}
    origin = session.execute(
        select(Event)
        .where(Event.run_id == run.id, Event.rank == rank, Event.kind.in_(ORIGIN_KINDS))
        .order_by(Event.step, Event.id)
        .limit(1)
    ).scalar_one_or_none()
    tensor, step = names[0], steps[-1]
    if origin is not None:
        named = [t.get("name") for t in origin.details.get("tensors", []) if isinstance(t, dict)]
        tensor = next((name for name in named if name in names), tensor)
        step = max((s for s in steps if s <= origin.step), default=step)
    return {"kind": kind, "rank": rank, "steps": steps, "suggested": {"tensor": tensor, "step": step}}


def tail(session: Session, run: Run, rank: int, after: int, stale_after: float) -> dict[str, Any]:
    """The per-step scalars and the events of the steps after ``after`` (at most ``TAIL_LIMIT`` steps):
    one index range read, so a live page costs the collector little per poll."""
    steps = step_blocks.Reader(session, run.id, rank, len(run.tensors)).range(after + 1, wanted=())
    try:
        rows = list(itertools.islice(steps, TAIL_LIMIT + 1))
    finally:
        steps.close()
    truncated = len(rows) > TAIL_LIMIT
    rows = rows[:TAIL_LIMIT]
    values: dict[str, list] = {name: [protocol.encode_float(row[name]) for row in rows] for name in TAIL_SCALARS}
    values["lr"] = [row["lr"][0] if row["lr"] else None for row in rows]
    until = rows[-1]["step"] if rows else None
    query = select(Event).where(Event.run_id == run.id, Event.step > after).order_by(Event.step, Event.rank, Event.id)
    if truncated and until is not None:
        query = query.where(Event.step <= until)
    return {
        "run": run.name,
        "status": run_status(run, rank_states(session, run), stale_after),
        "after": after,
        "steps": [row["step"] for row in rows],
        "values": values,
        "truncated": truncated,
        "events": [event_record(event) for event in session.execute(query).scalars()],
    }
