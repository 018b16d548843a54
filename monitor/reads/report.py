"""Plain-text tables for `numwatch runs` and `numwatch show RUN`."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from numwatch.monitor.reads import queries
from numwatch.monitor.store.auth import EVERYTHING

RECENT_EVENTS = 15


def _number(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _events(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}={count}" for kind, count in counts.items()) or "-"


def render_runs(session: Session, stale_after: float) -> str:
    """One line per run: status, last step, loss, grad norm, loss scale, events by kind."""
    summaries = [queries.run_summary(session, run, stale_after) for run in queries.visible_runs(session, EVERYTHING)]
    if not summaries:
        return "no runs yet: watch a training with numwatch.watch(...) and point it at this collector"
    rows = [
        [
            s["run"],
            s["project"],
            s["status"],
            str(s["last_step"]),
            _number(s["loss"]),
            _number(s["global_grad_norm"]),
            _number(s["loss_scale"]),
            _events(s["events"]),
        ]
        for s in summaries
    ]
    return _table(["RUN", "PROJECT", "STATUS", "STEP", "LOSS", "GRAD NORM", "SCALE", "EVENTS"], rows)


def render_run(session: Session, name: str, stale_after: float) -> str:
    """A run's state and its most recent events."""
    run = queries.find_run(session, name, EVERYTHING)
    detail = queries.run_detail(session, run, stale_after)
    last = detail["last_step_time"]
    lines = [
        f"run          {detail['run']} (project {detail['project']}, {detail['format']}, world size "
        f"{detail['world_size']})",
        f"status       {detail['status']}" + (f", last step {time.time() - last:.0f} s ago" if last else ""),
        f"last step    {detail['last_step']}  ({detail['steps_total']} attempts, {detail['skipped_steps_total']} "
        "skipped)",
        f"loss         {_number(detail['loss'])}",
        f"grad norm    {_number(detail['global_grad_norm'])}",
        f"loss scale   {_number(detail['loss_scale'])}",
        f"tensors      {len(detail['tensors'])}",
        f"events       {_events(detail['events'])}",
    ]
    recent = queries.events(session, run, None)[-RECENT_EVENTS:]
    if recent:
        rows = [[str(e["step"]), str(e["rank"]), e["kind"], _event_summary(e["details"])] for e in recent]
        lines += ["", f"last {len(recent)} events:", _table(["STEP", "RANK", "KIND", "DETAILS"], rows)]
    return "\n".join(lines)


def _event_summary(details: dict) -> str:
    if "tensors" in details and isinstance(details["tensors"], list):
        names = [t.get("name", t.get("index")) if isinstance(t, dict) else t for t in details["tensors"][:3]]
        return f"tensors: {', '.join(map(str, names))}" + (" ..." if len(details["tensors"]) > 3 else "")
    text = ", ".join(f"{key}={_number(value) if isinstance(value, float) else value}" for key, value in details.items())
    return text[:100]
