"""Read-side queries over the store, shared by the HTTP read API and the CLI reports."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.auth import Principal
from numwatch.monitor.errors import NotFound
from numwatch.monitor.models import Event, Histogram, RankState, Run, Step
from numwatch.monitor.packing import unpack_stats

STEP_SCALARS = ("loss", "global_grad_norm", "loss_scale", "new_loss_scale", "headroom_bits", "step_time", "clip_coef", "post_clip_grad_norm")
DERIVED_SCALARS = ("lr", "skipped")


def run_status(run: Run, states: Sequence[RankState], stale_after: float, now: float | None = None) -> str:
    """running | finished | crashed | stale: running, but no rank stored a step (or, before the first
    step, registered) for more than ``stale_after`` seconds."""
    last = max((state.last_step_time for state in states), default=0.0) or run.last_seen_at.timestamp()
    if run.status == "running" and (time.time() if now is None else now) - last > stale_after:
        return "stale"
    return run.status


def visible_runs(session: Session, principal: Principal) -> list[Run]:
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc())
    if principal.project is not None:
        query = query.where(Run.project == principal.project)
    return list(session.execute(query).scalars())


def find_run(session: Session, name: str, principal: Principal) -> Run:
    """The run called ``name`` if the caller may see it; NotFound otherwise (also for other projects' runs)."""
    run = session.execute(select(Run).where(Run.name == name)).scalar_one_or_none()
    if run is None or not principal.may_access(run.project):
        raise NotFound(f"unknown run {name!r} (a run exists once registered with POST /api/v1/runs)")
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
        "run": run.name, "project": run.project, "format": run.format, "world_size": run.world_size,
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
        "config": run.config, "tensors": run.tensors, "modules": run.modules,
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


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points keeping each bucket's min and max (a spike survives), in step order.

    Non-finite values are extremes too: a NaN in a bucket is always kept.
    """
    if len(steps) <= max_points:
        return steps, values
    buckets = max(1, max_points // 2)
    keep: list[int] = []
    for chunk in np.array_split(np.arange(len(steps)), buckets):
        chunk_values = values[chunk]
        nonfinite = chunk[~np.isfinite(chunk_values)]
        finite = chunk[np.isfinite(chunk_values)]
        picks = set(nonfinite[:2].tolist())
        if finite.size and len(picks) < 2:
            picks.add(int(finite[np.argmax(values[finite])]))
            if len(picks) < 2:
                picks.add(int(finite[np.argmin(values[finite])]))
        keep.extend(sorted(picks))
    index = np.array(keep, dtype=np.int64)
    return steps[index], values[index]


def series(session: Session, run: Run, metric: str, tensor: str | None, rank: int, start: int | None, end: int | None, max_points: int) -> dict[str, list]:
    """``{"steps", "values"}`` of a per-step scalar or a per-tensor stat, downsampled keeping extremes."""
    if metric not in STEP_SCALARS and metric not in DERIVED_SCALARS and metric not in protocol.TENSOR_STATS:
        valid = ", ".join((*STEP_SCALARS, *DERIVED_SCALARS, *protocol.TENSOR_STATS))
        raise NotFound(f"unknown metric {metric!r}; valid: {valid}")
    per_tensor = metric in protocol.TENSOR_STATS
    index = _tensor_index(run, tensor) if per_tensor else None
    columns = [Step.step, Step.stat_names, Step.tensor_stats] if per_tensor else [Step.step, getattr(Step, metric)]
    query = select(*columns).where(Step.run_id == run.id, Step.rank == rank)
    if start is not None:
        query = query.where(Step.step >= start)
    if end is not None:
        query = query.where(Step.step <= end)
    steps, values = [], []
    for row in session.execute(query.order_by(Step.step)):
        if per_tensor:
            stats = unpack_stats(row.stat_names, bytes(row.tensor_stats), len(run.tensors))
            if metric not in stats:
                continue  # a sampled stat is absent on the other steps
            value = float(stats[metric][index])
        elif metric == "lr":
            value = protocol.decode_float(row[1][0]) if row[1] else None
        else:
            value = row[1]
        if value is None:
            continue
        steps.append(row.step)
        values.append(float(value))
    step_array, value_array = downsample(np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64), max_points)
    return {"steps": step_array.tolist(), "values": [protocol.encode_float(v) for v in value_array.tolist()]}


def step_record(session: Session, run: Run, number: int, rank: int) -> dict[str, Any]:
    row = session.get(Step, (run.id, rank, number))
    if row is None:
        raise NotFound(f"run {run.name!r} has no step {number} on rank {rank}")
    stats = unpack_stats(row.stat_names, bytes(row.tensor_stats), len(run.tensors))
    tensors = {
        t["name"]: {name: protocol.encode_float(values[i].item()) if values.dtype.kind == "f" else int(values[i]) for name, values in stats.items()}
        for i, t in enumerate(run.tensors)
    }
    record = {key: protocol.encode_float(getattr(row, key)) for key in STEP_SCALARS}
    events = session.execute(select(Event).where(Event.run_id == run.id, Event.rank == rank, Event.step == number).order_by(Event.id)).scalars()
    return {
        "run": run.name, "rank": rank, "step": row.step, "time": row.time, "skipped": row.skipped, "clipped": row.clipped,
        "scale_decision": row.scale_decision, "lr": row.lr, "scalars": row.scalars, **record,
        "tensors": tensors, "events": [event_record(event) for event in events],
    }


def event_record(event: Event) -> dict[str, Any]:
    return {"step": event.step, "rank": event.rank, "kind": event.kind, "details": event.details, "time": event.time, "time_ms": int(event.time * 1000)}


def events(session: Session, run: Run, kind: str | None, limit: int = 10_000) -> list[dict[str, Any]]:
    query = select(Event).where(Event.run_id == run.id)
    if kind:
        query = query.where(Event.kind == kind)
    return [event_record(e) for e in session.execute(query.order_by(Event.step, Event.rank, Event.id).limit(limit)).scalars()]


def histograms(session: Session, run: Run, tensor: str, kind: str, rank: int, step: int | None) -> dict[str, Any]:
    """The exponent (binade) and linear histogram of ``tensor`` at ``step`` (default: the latest sampled)."""
    index = _tensor_index(run, tensor)
    query = select(Histogram).where(Histogram.run_id == run.id, Histogram.rank == rank, Histogram.kind == kind)
    query = query.where(Histogram.step == step) if step is not None else query.order_by(Histogram.step.desc()).limit(1)
    row = session.execute(query).scalars().first()
    if row is None:
        raise NotFound(f"no {kind} histogram for run {run.name!r}" + (f" at step {step}" if step is not None else "") + " (histograms are sampled every histogram_every steps)")
    exponent = np.frombuffer(row.exponent, dtype="<i8").reshape(-1, protocol.EXPONENT_BINS)[index]
    linear = np.frombuffer(row.linear, dtype="<i8").reshape(-1, protocol.LINEAR_BINS)[index]
    low = float(np.frombuffer(row.linear_min, dtype="<f4")[index])
    high = float(np.frombuffer(row.linear_max, dtype="<f4")[index])
    edges = np.linspace(low, high, protocol.LINEAR_BINS + 1) if np.isfinite(low) and np.isfinite(high) else np.full(protocol.LINEAR_BINS + 1, np.nan)
    binades = range(protocol.EXPONENT_MIN, protocol.EXPONENT_MAX + 1)
    return {
        "run": run.name, "tensor": tensor, "kind": kind, "rank": rank, "step": row.step,
        # Non-empty binades only (a numeric x axis for Grafana); zero/Inf/NaN counts beside them.
        "exponent": [{"binade": binade, "count": int(count)} for binade, count in zip(binades, exponent) if count],
        "zero": int(exponent[protocol.EXPONENT_ZERO_BIN]),
        "inf": int(exponent[protocol.EXPONENT_INF_BIN]),
        "nan": int(exponent[protocol.EXPONENT_NAN_BIN]),
        "linear": [{"low": protocol.encode_float(a), "high": protocol.encode_float(b), "count": int(c)} for a, b, c in zip(edges[:-1].tolist(), edges[1:].tolist(), linear)],
    }


def heatmap(session: Session, run: Run, stat: str, rank: int, max_steps: int) -> list[dict[str, Any]]:
    """Flat ``[{"step", "tensor", "value"}]`` of a per-tensor stat over the last ``max_steps`` steps having it."""
    if stat not in protocol.TENSOR_STATS:
        raise NotFound(f"unknown stat {stat!r}; valid: {', '.join(protocol.TENSOR_STATS)}")
    rows = session.execute(
        select(Step.step, Step.stat_names, Step.tensor_stats).where(Step.run_id == run.id, Step.rank == rank, Step.stat_names.contains(stat))
        .order_by(Step.step.desc()).limit(max_steps)
    ).all()
    names = [t["name"] for t in run.tensors]
    out = []
    for row in reversed(rows):
        values = unpack_stats(row.stat_names, bytes(row.tensor_stats), len(names)).get(stat)
        if values is None:
            continue
        out.extend({"step": row.step, "tensor": name, "value": protocol.encode_float(float(v))} for name, v in zip(names, values.tolist()))
    return out
