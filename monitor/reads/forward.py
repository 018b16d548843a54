"""Forward-pass statistics of sampled steps: stored per step, run state for /metrics, series per attention call."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from numwatch.monitor.detectors.forward_events import attention_maxima
from numwatch.monitor.store.models import ForwardStats, RankState, Run
from numwatch.protocol import OUTPUT_LOGIT_STATS, encode_float

LOG_Z_COLUMNS = ("log_z_mean", "log_z_max", "logit_absmax")  # the columns of protocol.OUTPUT_LOGIT_STATS


def forward_row(run_id: int, rank: int, step: Any) -> dict[str, Any] | None:
    """The ``forward_stats`` row of a validated step document, or None when its forward was not measured."""
    if step.attention_logit_max is None and step.output_logits is None:
        return None
    logits = step.output_logits
    return {
        "run_id": run_id,
        "rank": rank,
        "step": step.step,
        "attention_calls": list(step.attention_logit_max or {}),
        "attention_logit_max": [encode_float(v) for v in (step.attention_logit_max or {}).values()],
        "log_z_mean": logits.log_z_mean if logits else None,
        "log_z_max": logits.log_z_max if logits else None,
        "logit_absmax": logits.absmax if logits else None,
    }


def step_stats(session: Session, run: Run, rank: int, step: int) -> dict[str, Any]:
    """One step's forward statistics as its step document carried them: ``attention_logit_max``
    per attention call and ``output_logits``, each null where that step's forward was not measured."""
    row = session.get(ForwardStats, (run.id, rank, step))
    attention = None
    logits = None
    if row is not None and row.attention_calls:
        attention = dict(zip(row.attention_calls, row.attention_logit_max, strict=True))  # stored protocol-encoded
    if row is not None and row.log_z_mean is not None:
        logits = {
            stat: encode_float(getattr(row, column))
            for stat, column in zip(OUTPUT_LOGIT_STATS, LOG_Z_COLUMNS, strict=True)
        }
    return {"attention_logit_max": attention, "output_logits": logits}


def _row_dict(row: ForwardStats) -> dict[str, Any]:
    return {name: getattr(row, name) for name in ("step", "attention_calls", "attention_logit_max", *LOG_Z_COLUMNS)}


def previous_row(session: Session, run_id: int, rank: int, before: int) -> dict[str, Any] | None:
    """The last stored row below step ``before``."""
    row = session.execute(
        select(ForwardStats)
        .where(ForwardStats.run_id == run_id, ForwardStats.rank == rank, ForwardStats.step < before)
        .order_by(ForwardStats.step.desc())
        .limit(1)
    ).scalar_one_or_none()
    return _row_dict(row) if row is not None else None


def largest(values: list[float]) -> float | None:
    """The maximum, NaN if any value is NaN (a NaN logit is the worst there is); None for none."""
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def update_rank_state(state: RankState, rows: list[dict[str, Any]]) -> None:
    """Last values from the highest new step that had them (``rows`` ascending)."""
    for row in reversed(rows):
        if row["attention_calls"]:
            state.attention_logit_max = largest(list(attention_maxima(row).values()))
            break
    for row in reversed(rows):
        if row["log_z_mean"] is not None:
            state.log_z_mean, state.log_z_max, state.output_logit_absmax = (
                row["log_z_mean"],
                row["log_z_max"],
                row["logit_absmax"],
            )
            break


def _buckets(count: int, max_points: int) -> list[range]:
    size = max(1, math.ceil(count / max_points))
    return [range(start, min(count, start + size)) for start in range(0, count, size)]


def series(
    session: Session, run: Run, rank: int, start: int | None, end: int | None, max_points: int
) -> dict[str, Any]:
    """Max attention logit per call and the output log Z over the measured steps, and the run's maximum.

    With more steps than ``max_points``, consecutive steps share a bucket that keeps, per
    attention call, the largest value (NaN wins), the mean of the mean log Z and the largest
    of the maxima; the bucket is named by its last step.
    """
    query = select(ForwardStats).where(ForwardStats.run_id == run.id, ForwardStats.rank == rank)
    if start is not None:
        query = query.where(ForwardStats.step >= start)
    if end is not None:
        query = query.where(ForwardStats.step <= end)
    rows = [_row_dict(row) for row in session.execute(query.order_by(ForwardStats.step)).scalars()]
    calls: dict[str, None] = {}
    per_row = [attention_maxima(row) for row in rows]
    for maxima in per_row:
        calls.update(dict.fromkeys(maxima))
    run_max: dict[str, Any] | None = None
    for row, maxima in zip(rows, per_row, strict=True):
        for name, value in maxima.items():
            if run_max is None or (math.isnan(value) and not math.isnan(run_max["value"])) or value > run_max["value"]:
                run_max = {"value": value, "call": name, "step": row["step"]}
    steps: list[int] = []
    attention: dict[str, list] = {name: [] for name in calls}
    log_z: dict[str, list] = {name: [] for name in LOG_Z_COLUMNS}
    for bucket in _buckets(len(rows), max_points):
        steps.append(rows[bucket[-1]]["step"])
        for name in calls:
            attention[name].append(encode_float(largest([per_row[i][name] for i in bucket if name in per_row[i]])))
        means = [rows[i]["log_z_mean"] for i in bucket if rows[i]["log_z_mean"] is not None]
        log_z["log_z_mean"].append(encode_float(sum(means) / len(means) if means else None))
        for name in ("log_z_max", "logit_absmax"):
            log_z[name].append(encode_float(largest([rows[i][name] for i in bucket if rows[i][name] is not None])))
    if run_max is not None:
        run_max["value"] = encode_float(run_max["value"])
    return {"rank": rank, "steps": steps, "attention_logit_max": attention, "run_max": run_max, **log_z}
