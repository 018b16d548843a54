"""Loss and gradient-norm spikes, judged on ingest at step resolution.

A value is a spike when it exceeds mean + k·σ (population σ) of the last W finite values
of its signal; a value is judged only once W finite values precede it. Consecutive spike
values form one episode, and an episode produces one event, at its first step.

Each batch is judged from the stored steps before it (the last 2·W finite values of each
signal, so the step before the batch is itself judged and an episode that started there
continues), never from process memory: replicas and a restarted collector judge alike.

The rolling spike score is the share of spike values among a signal's last N judged
values. Its state lives in ``rank_state.spike_state`` as, per signal, the count of judged
values and the spike episodes among the last N as ``[first, last]`` judged ordinals, so
it stays bounded however long the run is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sqlalchemy.orm import Session

from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.monitor.store import blocks as step_blocks
from numwatch.protocol import DetectorEventKind, event_document

# signal -> (step column, event kind)
SIGNALS: dict[str, tuple[str, DetectorEventKind]] = {
    "loss": ("loss", "loss_spike"),
    "grad_norm": ("global_grad_norm", "grad_norm_spike"),
}
Points = list[tuple[int, float]]
EMPTY: dict[str, Any] = {"judged": 0, "episodes": []}


@dataclass(frozen=True)
class Judgement:
    step: int
    value: float
    mean: float
    std: float
    threshold: float
    spike: bool


def judge(points: Sequence[tuple[int, float]], sigmas: float, window: int) -> list[Judgement]:
    """Every finite value of ``points`` (ascending steps) that has ``window`` finite values before it."""
    finite = [(step, value) for step, value in points if math.isfinite(value)]
    if len(finite) <= window:
        return []
    values = np.array([value for _, value in finite], dtype=np.float64)
    windows = sliding_window_view(values[:-1], window)  # row i: the W values before values[i + W]
    means, stds = windows.mean(axis=1), windows.std(axis=1)
    thresholds = means + sigmas * stds
    return [
        Judgement(step, value, float(mean), float(std), float(threshold), bool(value > threshold))
        for (step, value), mean, std, threshold in zip(finite[window:], means, stds, thresholds, strict=True)
    ]


def stored_history(
    session: Session,
    run_id: int,
    rank: int,
    before: int,
    count: int,
    absent: Collection[str] = (),
    recent: list[dict[str, Any]] | None = None,
) -> dict[str, Points]:
    """Per signal, the last ``count`` stored values below step ``before``, ascending.

    The last ``count`` steps (``recent``, when the caller read them) serve every signal that has a value at
    each of them (the usual case); a signal some of those steps lack is read further back, from the blocks
    that hold it, unless its column is in ``absent`` (no stored step of the rank has it: a rank whose steps
    leave the replicated statistics to another rank never has a global gradient norm)."""
    reader = step_blocks.Reader(session, run_id, rank, 0)
    if recent is None:
        recent = reader.last(before, count, wanted=())
    out = {}
    for signal, (column, _) in SIGNALS.items():
        points = [(step["step"], step[column]) for step in recent if step[column] is not None]
        if len(points) < len(recent) and len(recent) == count and column not in absent:
            having = (step for step in reader.before(before, wanted=(), having=(column,)) if step[column] is not None)
            points = [(step["step"], step[column]) for step in itertools.islice(having, count)][::-1]
        out[signal] = points
    return out


def _nearest_spike_before(step: int, judgements: list[Judgement], window: int) -> int | None:
    """The latest spiking step at or before ``step``, within ``window`` steps of it."""
    earlier = [j.step for j in judgements if j.spike and step - window <= j.step <= step]
    return max(earlier) if earlier else None


def detect(
    history: dict[str, Points], views: list[dict[str, Any]], config: DetectorConfig
) -> tuple[list[dict[str, Any]], dict[str, list[Judgement]]]:
    """Spike events of the new step ``views`` (ascending), and each signal's judgements of them (for the score).

    ``history`` holds, per signal, the stored points before the batch (the last 2·W where
    the run has that many), ascending.
    """
    sigmas, window = config.spike_sigmas, config.spike_window
    times = {view["step"]: view["time"] for view in views}
    judged: dict[str, list[Judgement]] = {}
    fresh: dict[str, list[Judgement]] = {}
    for signal, (column, _) in SIGNALS.items():
        new = [(view["step"], view[column]) for view in views if view[column] is not None]
        judged[signal] = judge([*history[signal], *new], sigmas, window)
        fresh[signal] = [j for j in judged[signal] if new and j.step >= new[0][0]]
    events = []
    for signal, (_, kind) in SIGNALS.items():
        previous_spike = False
        for judgement in judged[signal]:
            starts = judgement.spike and not previous_spike
            previous_spike = judgement.spike
            if not starts or not fresh[signal] or judgement.step < fresh[signal][0].step:
                continue
            details: dict[str, Any] = {
                signal: judgement.value,
                "window_mean": judgement.mean,
                "window_std": judgement.std,
                "threshold": judgement.threshold,
                "sigmas": sigmas,
                "window": window,
            }
            if signal == "loss":
                grad_step = _nearest_spike_before(judgement.step, judged["grad_norm"], window)
                details["grad_norm_spike_step"] = grad_step
                if grad_step is not None:
                    earlier = judgement.step - grad_step
                    details["grad_norm_spike_steps_earlier"] = earlier
                    details["note"] = (
                        f"grad norm spiked {earlier} steps earlier" if earlier else "grad norm spiked at the same step"
                    )
            events.append(dict(event_document(judgement.step, kind, details, time=times[judgement.step])))
    return events, fresh


def advance_score(state: dict[str, Any] | None, fresh: dict[str, list[Judgement]], steps: int) -> dict[str, Any]:
    """``rank_state.spike_state`` after the newly judged values (ascending per signal)."""
    state = {signal: dict(values) for signal, values in (state or {}).items()}
    for signal, judgements in fresh.items():
        entry = state.setdefault(signal, dict(EMPTY))
        judged, episodes = entry["judged"], [list(e) for e in entry["episodes"]]
        for judgement in judgements:
            judged += 1
            if judgement.spike:
                if episodes and episodes[-1][1] == judged - 1:
                    episodes[-1][1] = judged
                else:
                    episodes.append([judged, judged])
        oldest = judged - steps + 1
        entry["judged"] = judged
        entry["episodes"] = [[max(first, oldest), last] for first, last in episodes if last >= oldest]
    return state


def score(entry: dict[str, Any], steps: int) -> float:
    """Share of spike values among the signal's last ``steps`` judged values (0 before any)."""
    judged = entry["judged"]
    if judged == 0:
        return 0.0
    return sum(last - first + 1 for first, last in entry["episodes"]) / min(judged, steps)
