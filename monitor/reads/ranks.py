"""The Ranks view of a multi-rank run: each rank's own health over steps, its latest values, missing ranks.

Every rank's series comes from its own rollups and steps (``numwatch.monitor.reads.series``),
so the cost is bounded per rank whatever the run's length: the heatmap keeps each bucket's
largest local gradient norm (NaN when the bucket holds one, +Inf next), the compute-time
series each bucket's minimum, maximum and first NaN, like ``/series``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.reads import queries, series
from numwatch.monitor.store.models import Event, RankJudge, Run
from numwatch.monitor.store.rollups import Summary

CROSS_RANK_KINDS = ("rank_nonfinite", "rank_outlier", "straggler", "replica_divergence")
MAX_LINES = 16  # compute-time lines drawn: the ranks farthest from the median beyond this


def _bucket_value(summary: Summary) -> float:
    """A heatmap cell: NaN if the bucket holds one, else its largest value (+Inf included)."""
    return math.nan if summary.nan_at[0] >= 0 else float(summary.high[0])


def _points(
    session: Session, run: Run, rank: int, name: str, start: int | None, end: int | None, max_steps: int
) -> dict[int, float]:
    rows, summaries = series.read_window(session, run.id, rank, name, start, end, max_steps, max_steps, 0, None)
    points = {step: float(values[0]) for step, values in rows}
    points.update((first, _bucket_value(summary)) for first, summary in summaries)
    return points


def _cells(session: Session, run: Run, rank: int, start: int | None, end: int | None, max_steps: int) -> list[dict]:
    """The rank's heatmap row: its local gradient norm, NaN where the step (bucket) had NaN/Inf local elements
    (a later synchronising backward of the same optimizer step may have replaced a non-finite norm)."""
    norms = _points(session, run, rank, "local_grad_norm", start, end, max_steps)
    nonfinite = _points(session, run, rank, "local_nonfinite", start, end, max_steps)
    return [
        {
            "step": step,
            "tensor": f"rank {rank}",
            "value": protocol.encode_float(math.nan if nonfinite.get(step, 0.0) > 0 else value),
        }
        for step, value in sorted(norms.items())
    ]


def _deviation(value: float | None, median: float | None) -> float:
    """|log(value / median)|: 0 at the median, the same for 2x above and below; inf when not finite."""
    if value is None or median is None or median <= 0:
        return 0.0
    if not math.isfinite(value) or value <= 0:
        return math.inf
    return abs(math.log(value / median))


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def rank_view(
    session: Session, run: Run, max_steps: int, max_points: int, start: int | None = None, end: int | None = None
) -> dict[str, Any]:
    """The Ranks section's data (see the module docstring)."""
    states = queries.rank_states(session, run)
    norm_median = _median([s.local_grad_norm for s in states])
    time_median = _median([s.compute_time for s in states])
    deviations = {
        s.rank: math.inf
        if s.local_nonfinite
        else max(_deviation(s.local_grad_norm, norm_median), _deviation(s.compute_time, time_median))
        for s in states
    }
    by_deviation = sorted(states, key=lambda s: (-deviations[s.rank], s.rank))
    latest = [
        {
            "rank": s.rank,
            "step": s.last_step,
            "local_grad_norm": protocol.encode_float(s.local_grad_norm),
            "local_nonfinite": s.local_nonfinite,
            "compute_time": protocol.encode_float(s.compute_time),
            "loss": protocol.encode_float(s.loss),
            "deviation": protocol.encode_float(deviations[s.rank]),
        }
        for s in by_deviation
    ]
    cells = [cell for s in states for cell in _cells(session, run, s.rank, start, end, max_steps)]
    drawn = sorted(s.rank for s in by_deviation[:MAX_LINES])
    compute = {
        str(rank): queries.series(session, run, "compute_time", None, rank, start, end, max_points) for rank in drawn
    }
    judge = session.get(RankJudge, run.id)
    state = (judge.state if judge is not None else None) or {}
    events = (
        session.query(Event)
        .filter(Event.run_id == run.id, Event.kind.in_(CROSS_RANK_KINDS))
        .order_by(Event.step, Event.rank, Event.id)
        .limit(1000)
        .all()
    )
    return {
        "run": run.name,
        "world_size": run.world_size,
        "ranks": [s.rank for s in states],
        "judged_through": judge.judged_through if judge is not None else 0,
        "local_grad_norm": cells,
        "compute_time": compute,
        "latest": latest,
        "missing": [{"first": first, "last": last, "ranks": ranks} for first, last, ranks in state.get("gaps", [])],
        "stragglers": state.get("stragglers", []),
        "diverged": state.get("diverged", []),
        "events": [
            {"step": e.step, "rank": e.rank, "kind": e.kind, "details": e.details, "time": e.time} for e in events
        ],
    }
