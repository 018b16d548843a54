"""Read-side queries over the store, shared by the HTTP read API and the CLI reports."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.errors import NotFound
from numwatch.monitor.reads import forward
from numwatch.monitor.reads.series import read_window, summary_points
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store.auth import Principal
from numwatch.monitor.store.models import DELETING, Event, Histogram, RankState, Run
from numwatch.monitor.store.packing import decompress_histogram_array
from numwatch.monitor.store.rollups import CLIP_SCALARS, LOCAL_SERIES, SCALAR_SERIES, STEP_SCALARS


def run_status(run: Run, states: Sequence[RankState], stale_after: float, now: float | None = None) -> str:
    """running | finished | crashed | stale: running, but no rank stored a step (or, before the first
    step, registered) for more than ``stale_after`` seconds."""
    last = max((state.last_step_time for state in states), default=0.0) or run.last_seen_at.timestamp()
    if run.status == "running" and (time.time() if now is None else now) - last > stale_after:
        return "stale"
    return run.status


def visible_runs(session: Session, principal: Principal) -> list[Run]:
    query = select(Run).where(Run.status != DELETING).order_by(Run.created_at.desc(), Run.id.desc())
    if principal.project is not None:
        query = query.where(Run.project == principal.project)
    return list(session.execute(query).scalars())


def find_run(session: Session, name: str, principal: Principal) -> Run:
    """The run called ``name`` if the caller may see it; NotFound otherwise (also for other projects' runs)."""
    return visible_run(session.execute(select(Run).where(Run.name == name)).scalar_one_or_none(), name, principal)


def visible_run(run: Run | None, name: str, principal: Principal) -> Run:
    """``run`` (looked up as ``name``) if the caller may see it; NotFound otherwise."""
    if run is None or run.status == DELETING or not principal.may_access(run.project):
        raise NotFound(f"unknown run {name!r} (a run exists once registered with POST {protocol.RUNS_PATH})")
    return run


def rank_states(session: Session, run: Run) -> list[RankState]:
    return list(session.execute(select(RankState).where(RankState.run_id == run.id).order_by(RankState.rank)).scalars())


def run_summary(session: Session, run: Run, stale_after: float) -> dict[str, Any]:
    """One line of the run list: status, last step, last values, events by kind (all ranks)."""
    states = rank_states(session, run)
    lead = max(states, key=lambda s: (s.last_step, -s.rank), default=None)
    events: dict[str, int] = {}
    for state in states:
        for kind, count in state.events_total.items():
            events[kind] = events.get(kind, 0) + count
    return {
        "run": run.name,
        "project": run.project,
        "format": run.format,
        "world_size": run.world_size,
        "started_at": run.started_at.timestamp(),
        "status": run_status(run, states, stale_after),
        "last_step": lead.last_step if lead else 0,
        "last_step_time": lead.last_step_time if lead else None,
        "loss": protocol.encode_float(lead.loss) if lead else None,
        "global_grad_norm": protocol.encode_float(lead.global_grad_norm) if lead else None,
        "loss_scale": protocol.encode_float(lead.loss_scale) if lead else None,
        "steps_total": sum(s.steps_total for s in states),
        "skipped_steps_total": sum(s.skipped_steps_total for s in states),
        "events": dict(sorted(events.items())),
    }


def run_detail(session: Session, run: Run, stale_after: float) -> dict[str, Any]:
    return {
        **run_summary(session, run, stale_after),
        "config": run.config,
        "tensors": run.tensors,
        "modules": run.modules,
        "finished_at": run.finished_at.timestamp() if run.finished_at else None,
        "ranks": [state.rank for state in rank_states(session, run)],
    }


def _tensor_index(run: Run, tensor: str | None) -> int:
    names = [t["name"] for t in run.tensors]
    if tensor is None:
        raise NotFound(f"per-tensor metrics need tensor=NAME; tensors of {run.name!r}: {', '.join(names[:50])}")
    try:
        return names.index(tensor)
    except ValueError:
        raise NotFound(f"unknown tensor {tensor!r}; tensors of {run.name!r}: {', '.join(names[:50])}") from None


def _check_series(name: str, valid: tuple[str, ...], what: str) -> None:
    if name not in valid:
        raise NotFound(f"unknown {what} {name!r}; valid: {', '.join(valid)}")


def series(
    session: Session,
    run: Run,
    metric: str,
    tensor: str | None,
    rank: int,
    start: int | None,
    end: int | None,
    max_points: int,
) -> dict[str, list]:
    """``{"steps", "values"}`` of a per-step scalar or a per-tensor stat: every point when at most ``max_points``,
    else per bucket of steps its minimum, maximum and first NaN (at most ``max_points`` points)."""
    _check_series(metric, (*SCALAR_SERIES, *LOCAL_SERIES, *protocol.TENSOR_STATS), "metric")
    index = _tensor_index(run, tensor) if metric in protocol.TENSOR_STATS else None
    rows, summaries = read_window(
        session, run.id, rank, metric, start, end, max_points, max(1, max_points // 3), len(run.tensors), index
    )
    points = [(step, float(values[0])) for step, values in rows] + [
        point for _, summary in summaries for point in summary_points(summary)
    ]
    return {"steps": [step for step, _ in points], "values": [protocol.encode_float(value) for _, value in points]}


def _local_record(row: dict[str, Any]) -> dict[str, Any] | None:
    """The rank's own health at a step (its gradient before the reduction), as the protocol writes it."""
    if row["local_grad_norm"] is None:
        return None
    return {
        "grad_norm": protocol.encode_float(row["local_grad_norm"]),
        "nonfinite": row["local_nonfinite"],
        "compute_time": protocol.encode_float(row["compute_time"]),
        "nonfinite_tensors": row["nonfinite_tensors"],
        "checksum": None if row["checksum"] is None else str(row["checksum"]),
    }


def step_record(session: Session, run: Run, number: int, rank: int) -> dict[str, Any]:
    row = step_blocks.Reader(session, run.id, rank, len(run.tensors), len(run.modules)).find(
        number, wanted=protocol.TENSOR_STATS
    )
    if row is None:
        raise NotFound(f"run {run.name!r} has no step {number} on rank {rank}")
    stats = row["tensors"]
    tensors = {
        t["name"]: {
            name: protocol.encode_float(values[i].item()) if values.dtype.kind == "f" else int(values[i])
            for name, values in stats.items()
        }
        for i, t in enumerate(run.tensors)
    }
    record = {key: protocol.encode_float(row[key]) for key in (*STEP_SCALARS, *CLIP_SCALARS)}
    events = session.execute(
        select(Event).where(Event.run_id == run.id, Event.rank == rank, Event.step == number).order_by(Event.id)
    ).scalars()
    return {
        "run": run.name,
        "rank": rank,
        "step": number,
        "time": row["time"],
        "skipped": row["skipped"],
        "clipped": row["clipped"],
        "scale_decision": row["scale_decision"],
        "lr": row["lr"],
        "scalars": row["scalars"],
        **record,
        "local": _local_record(row),
        "replicated_by": row["replicated_by"],
        "tensors": tensors,
        **forward.step_stats(session, run, rank, number),
        "events": [event_record(event) for event in events],
    }


def event_record(event: Event) -> dict[str, Any]:
    return {
        "step": event.step,
        "rank": event.rank,
        "kind": event.kind,
        "details": event.details,
        "time": event.time,
        "time_ms": int(event.time * 1000),
    }


def events(session: Session, run: Run, kind: str | None, limit: int = 10_000) -> list[dict[str, Any]]:
    query = select(Event).where(Event.run_id == run.id)
    if kind:
        query = query.where(Event.kind == kind)
    return [
        event_record(e)
        for e in session.execute(query.order_by(Event.step, Event.rank, Event.id).limit(limit)).scalars()
    ]


def histograms(session: Session, run: Run, tensor: str, kind: str, rank: int, step: int | None) -> dict[str, Any]:
    """The exponent (binade) and linear histogram of ``tensor`` at ``step`` (default: the latest sampled)."""
    index = _tensor_index(run, tensor)
    query = select(Histogram).where(Histogram.run_id == run.id, Histogram.rank == rank, Histogram.kind == kind)
    query = query.where(Histogram.step == step) if step is not None else query.order_by(Histogram.step.desc()).limit(1)
    row = session.execute(query).scalars().first()
    if row is None:
        raise NotFound(
            f"no {kind} histogram for run {run.name!r}"
            + (f" at step {step}" if step is not None else "")
            + " (histograms are sampled every histogram_every steps)"
        )
    arrays = {
        name: np.frombuffer(decompress_histogram_array(name, getattr(row, name)), dtype=protocol.HISTOGRAM_DTYPES[name])
        for name in protocol.HISTOGRAM_LENGTHS
    }
    exponent = arrays["exponent"].reshape(-1, protocol.EXPONENT_BINS)[index]
    linear = arrays["linear"].reshape(-1, protocol.LINEAR_BINS)[index]
    low, high = float(arrays["linear_min"][index]), float(arrays["linear_max"][index])
    edges = (
        np.linspace(low, high, protocol.LINEAR_BINS + 1)
        if np.isfinite(low) and np.isfinite(high)
        else np.full(protocol.LINEAR_BINS + 1, np.nan)
    )
    binades = range(protocol.EXPONENT_MIN, protocol.EXPONENT_MAX + 1)
    return {
        "run": run.name,
        "tensor": tensor,
        "kind": kind,
        "rank": rank,
        "step": row.step,
        # Non-empty binades only (a numeric x axis for Grafana); zero/Inf/NaN counts beside them.
        "exponent": [
            {"binade": binade, "count": int(count)}
            for binade, count in zip(binades, exponent[: protocol.EXPONENT_BINADES], strict=True)
            if count
        ],
        "zero": int(exponent[protocol.EXPONENT_ZERO_BIN]),
        "inf": int(exponent[protocol.EXPONENT_INF_BIN]),
        "nan": int(exponent[protocol.EXPONENT_NAN_BIN]),
        "linear": [
            {"low": protocol.encode_float(a), "high": protocol.encode_float(b), "count": int(c)}
            for a, b, c in zip(edges[:-1].tolist(), edges[1:].tolist(), linear, strict=True)
        ],
    }


@dataclass
class Heatmap:
    """A per-tensor stat over steps: ``values[column, tensor]`` at each column's first step ``steps[column]``."""

    steps: list[int]
    tensors: list[str]
    values: np.ndarray

    def cells(self) -> list[dict[str, Any]]:
        """Flat ``[{"step", "tensor", "value"}]``, column by column."""
        return [
            {"step": step, "tensor": name, "value": protocol.encode_float(value)}
            for step, row in zip(self.steps, self.values.tolist(), strict=True)
            for name, value in zip(self.tensors, row, strict=True)
        ]

    def cells_json(self) -> bytes:
        """:meth:`cells` as JSON text, rendered without building a dict per cell (60k cells in tens of ms)."""
        names = [json.dumps(name) for name in self.tensors]
        parts = []
        for step, row in zip(self.steps, self.values.tolist(), strict=True):
            head = f'{{"step":{step},"tensor":'
            parts += [f'{head}{name},"value":{_json_float(value)}}}' for name, value in zip(names, row, strict=True)]
        return ("[" + ",".join(parts) + "]").encode()


def _json_float(value: float) -> str:
    """``json.dumps(protocol.encode_float(value))``, faster."""
    return repr(value) if math.isfinite(value) else json.dumps(protocol.encode_float(value))


def heatmap(
    session: Session, run: Run, stat: str, rank: int, max_steps: int, start: int | None = None, end: int | None = None
) -> Heatmap:
    """A per-tensor stat over the window (default: the whole run).

    Every step having the stat when at most ``max_steps`` do; else ``max_steps`` buckets of steps, each
    cell the bucket's maximum (NaN when the bucket holds one), ``step`` the bucket's first step.
    """
    _check_series(stat, tuple(protocol.TENSOR_STATS), "stat")
    names = [t["name"] for t in run.tensors]
    rows, summaries = read_window(session, run.id, rank, stat, start, end, max_steps, max_steps, len(names), None)
    columns = [values.astype(np.float64) for _, values in rows] + [
        np.where(summary.nan_at >= 0, np.nan, summary.high.astype(np.float64)) for _, summary in summaries
    ]
    steps = [step for step, _ in rows] + [step for step, _ in summaries]
    return Heatmap(steps, names, np.stack(columns) if columns else np.zeros((0, len(names))))
