"""Detectors across the ranks of a job: judged one step at a time, once the step's ranks are in.

Each rank sends its own health per step (``step.local``: its gradient before the reduction,
its compute time, on sampled steps its replicated weights' checksum; and its own loss). A step
is judged when every rank of the job sent it, or, so that a dead or late rank never holds the
others back, once more than half the ranks are ``rank_wait_steps`` steps past it, or once every rank
missing it sent its last batch or stalled that far behind the majority; the ranks missing then are
recorded (:func:`note_missing`) and a late arrival is stored but not judged again.

* ``rank_nonfinite``: the first step of an episode where some rank's local gradient or loss is
  not finite. It names those ranks and the finite ones: every rank at once points at the
  numerics (all ranks compute the same model on similar data), some ranks at their devices
  (faulty hardware, silent corruption) or their data. After the all-reduce every rank's
  gradient is non-finite, so the local values are the only place the origin shows.
* ``rank_outlier``: a rank whose local gradient norm (on a log scale) or loss is more than
  ``rank_outlier_threshold`` robust sigmas (1.4826 × the median absolute deviation) from the
  ranks' median and also ``rank_outlier_min_ratio`` times above or below it (norm), or that many
  times the median's distance from zero away from it (loss): with few ranks the MAD alone can be
  tiny by chance, and small batches' gradients differ by 2x. Once per episode per rank.
* ``straggler``: a rank whose compute time is above ``straggler_factor`` × the ranks' median
  (and by more than ``straggler_min_excess`` seconds) for ``straggler_steps`` consecutive steps.
* ``replica_divergence``: ranks whose replicated weights' checksum differs from the majority's
  on a sampled step; a tie (no majority) names every rank outside the lowest rank's group.

The state between steps (open episodes, slow streaks, missing ranks) is a JSON object kept
with the run (``rank_judge.state``), so replicas and a restarted collector judge alike.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.protocol import DetectorEventKind, encode_float, event_document

MAX_GAPS = 256  # missing-rank records kept per run (the latest)
OUTLIER_METRICS = ("local_grad_norm", "loss")
MAD_SIGMA = 1.4826  # MAD of a normal distribution × this = its sigma


@dataclass(frozen=True)
class RankHealth:
    """One rank's values at one step (None: not sent)."""

    rank: int
    time: float
    loss: float | None = None
    local_grad_norm: float | None = None
    local_nonfinite: int | None = None
    compute_time: float | None = None
    checksum: int | None = None
    nonfinite_tensors: list[str] | None = None

    @property
    def nonfinite(self) -> bool:
        return (
            bool(self.local_nonfinite)
            or (self.local_grad_norm is not None and not math.isfinite(self.local_grad_norm))
            or (self.loss is not None and not math.isfinite(self.loss))
        )


def empty_state() -> dict[str, Any]:
    return {
        "nonfinite": [],
        "outliers": {},
        "slow": {},
        "stragglers": [],
        "diverged": [],
        "gaps": [],
        "last": 0,
        "finished": [],  # ranks whose last batch came: a step they lack is not waited for
    }


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _event(step: int, time: float, kind: DetectorEventKind, at: int, **details: Any) -> tuple[int, dict[str, Any]]:
    """An event stored under rank ``at``."""
    return at, dict(event_document(step, kind, details, time=time))


def note_missing(state: dict[str, Any], step: int, missing: list[int]) -> None:
    """Record which ranks had not sent ``step`` when it was judged (consecutive steps alike merged)."""
    gaps = state["gaps"]
    if missing:
        if gaps and gaps[-1][2] == missing and gaps[-1][1] == state["last"]:
            gaps[-1][1] = step
        else:
            gaps.append([step, step, missing])
            del gaps[:-MAX_GAPS]
    state["last"] = step


def judge_step(
    step: int, ranks: dict[int, RankHealth], world_size: int, state: dict[str, Any], config: DetectorConfig
) -> list[tuple[int, dict[str, Any]]]:
    """Events of ``step`` (each with the rank it is stored under) from the ranks that sent it; advances ``state``."""
    present = sorted(ranks)
    missing = sorted(set(range(max(world_size, max(present, default=-1) + 1))) - set(present))
    time = max(health.time for health in ranks.values())
    note_missing(state, step, missing)
    events = _nonfinite(step, time, ranks, world_size, missing, state)
    events += _outliers(step, time, ranks, state, config)
    events += _stragglers(step, time, ranks, state, config)
    events += _divergence(step, time, ranks, state)
    return events


def _nonfinite(
    step: int, time: float, ranks: dict[int, RankHealth], world_size: int, missing: list[int], state: dict[str, Any]
) -> list[tuple[int, dict[str, Any]]]:
    bad = [rank for rank, health in sorted(ranks.items()) if health.nonfinite]
    opened = bool(bad) and not state["nonfinite"]
    state["nonfinite"] = bad
    if not opened:
        return []
    finite = [rank for rank in sorted(ranks) if rank not in bad]
    every = not finite and not missing
    gradient = any(ranks[r].local_nonfinite or not math.isfinite(ranks[r].local_grad_norm or 0.0) for r in bad)
    what = "non-finite local gradient" if gradient else "non-finite loss"
    if every:
        message = f"all {world_size} ranks produced a {what} at once at step {step}"
        diagnosis = (
            "every rank at once: the numerics of the model or the recipe (learning rate, loss scale, an "
            "overflowing layer), not one device"
        )
    else:
        message = f"{_ranks_text(bad)} of {world_size} first produced a {what} at step {step}"
        message += f"; {_ranks_text(finite)} finite" if finite else ""
        message += f"; {_ranks_text(missing)} not reported" if missing else ""
        diagnosis = (
            f"only {_ranks_text(bad)}: that device (faulty hardware, silent data corruption) or that rank's data "
            "at this step; the other ranks' gradients were finite before the all-reduce"
        )
    return [
        _event(
            step,
            time,
            "rank_nonfinite",
            bad[0],
            ranks=bad,
            finite_ranks=finite,
            missing_ranks=missing,
            world_size=world_size,
            all_ranks=every,
            message=message,
            diagnosis=diagnosis,
            local_grad_norm={str(r): encode_float(ranks[r].local_grad_norm) for r in bad},
            loss={str(r): encode_float(ranks[r].loss) for r in bad},
            tensors={str(r): ranks[r].nonfinite_tensors for r in bad if ranks[r].nonfinite_tensors},
        )
    ]


def _outliers(
    step: int, time: float, ranks: dict[int, RankHealth], state: dict[str, Any], config: DetectorConfig
) -> list[tuple[int, dict[str, Any]]]:
    found: dict[int, dict[str, Any]] = {}
    for metric in OUTLIER_METRICS:
        values = {
            rank: value
            for rank, health in ranks.items()
            if (value := getattr(health, metric)) is not None
            and math.isfinite(value)
            and (value > 0 or metric == "loss")
        }
        now: list[int] = []
        if len(values) >= config.rank_outlier_min_ranks:
            scaled = {rank: math.log(v) if metric == "local_grad_norm" else v for rank, v in values.items()}
            median = statistics.median(scaled.values())
            sigma = MAD_SIGMA * statistics.median(abs(v - median) for v in scaled.values())
            for rank, value in sorted(scaled.items()):
                far = (
                    abs(value - median) > math.log(config.rank_outlier_min_ratio)
                    if metric == "local_grad_norm"
                    else abs(value - median) > config.rank_outlier_min_ratio * abs(median)
                )
                score = math.inf if sigma == 0 else abs(value - median) / sigma
                if far and score > config.rank_outlier_threshold:
                    now.append(rank)
                    if rank not in state["outliers"].get(metric, []):
                        found.setdefault(rank, {})[metric] = {
                            "value": values[rank],
                            "median": math.exp(median) if metric == "local_grad_norm" else median,
                            "robust_sigmas": encode_float(score),
                        }
        state["outliers"][metric] = now
    return [
        _event(
            step,
            time,
            "rank_outlier",
            rank,
            rank=rank,
            metrics=metrics,
            threshold=config.rank_outlier_threshold,
            ranks=len(ranks),
            message=f"rank {rank} is far from the other ranks at step {step}: "
            + ", ".join(f"{m} {v['value']:.4g} (median {v['median']:.4g})" for m, v in metrics.items()),
        )
        for rank, metrics in sorted(found.items())
    ]


def _stragglers(
    step: int, time: float, ranks: dict[int, RankHealth], state: dict[str, Any], config: DetectorConfig
) -> list[tuple[int, dict[str, Any]]]:
    times = {rank: h.compute_time for rank, h in ranks.items() if h.compute_time is not None}
    if len(times) < 2:
        return []
    median = statistics.median(times.values())
    events = []
    for rank, seconds in sorted(times.items()):
        slow = seconds > config.straggler_factor * median and seconds - median > config.straggler_min_excess
        streak = state["slow"].get(str(rank), 0) + 1 if slow else 0
        state["slow"][str(rank)] = streak
        if streak == config.straggler_steps:
            events.append(
                _event(
                    step,
                    time,
                    "straggler",
                    rank,
                    rank=rank,
                    compute_time=seconds,
                    median=median,
                    ratio=seconds / median if median > 0 else None,
                    steps=config.straggler_steps,
                    factor=config.straggler_factor,
                    message=f"rank {rank} has been slower than {config.straggler_factor}x the ranks' median compute "
                    f"time for {config.straggler_steps} steps ({seconds:.3g} s against {median:.3g} s at step {step})",
                )
            )
    state["stragglers"] = sorted(
        int(rank) for rank, streak in state["slow"].items() if streak >= config.straggler_steps
    )
    return events


def _divergence(
    step: int, time: float, ranks: dict[int, RankHealth], state: dict[str, Any]
) -> list[tuple[int, dict[str, Any]]]:
    sums = {rank: h.checksum for rank, h in sorted(ranks.items()) if h.checksum is not None}
    if len(sums) < 2:
        return []
    counts = Counter(sums.values()).most_common()
    if len(counts) == 1:
        state["diverged"] = []
        return []
    majority = counts[0][0] if counts[0][1] > counts[1][1] else sums[min(sums)]
    odd = [rank for rank, value in sums.items() if value != majority]
    new = [rank for rank in odd if rank not in state["diverged"]]
    state["diverged"] = odd
    if not new:
        return []
    agreeing = [rank for rank in sums if rank not in odd]
    return [
        _event(
            step,
            time,
            "replica_divergence",
            new[0],
            ranks=odd,
            agreeing_ranks=agreeing,
            majority=counts[0][1] > counts[1][1],
            checksums={str(rank): str(value) for rank, value in sums.items()},
            message=f"the replicated weights of {_ranks_text(odd)} differ from those of {_ranks_text(agreeing)} "
            f"at step {step} (bit-pattern checksums differ)",
        )
    ]
