"""/metrics families of a multi-rank run's per-rank health, bounded for large jobs.

Per rank (``rank`` label): its loss, its local gradient norm and non-finite count before the
reduction, its compute time, and whether the cross-rank detectors hold it a straggler or its
replicated weights diverged now. Up to ``metrics_max_ranks`` ranks every rank is listed;
beyond, only the ranks the detectors name, those sending the replicated statistics and those
holding the extreme values, so a 512-rank job adds a few series, not 512 per metric (the
collector's other per-rank families, ``numwatch_loss``, ``numwatch_steps_total``..., list the
same ranks then: :meth:`RankFamilies.listed`). ``numwatch_ranks_*`` always give the minimum, median
and maximum over all ranks (``stat`` label) and how many ranks were missing at the last
judged step.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from numwatch.monitor.store.models import RankJudge, RankState, Run

# (rank_state attribute, metric suffix, help); each has numwatch_ranks_<suffix> and, but the loss (which
# numwatch_loss has per rank already), numwatch_rank_<suffix>.
SIGNALS = (
    ("loss", "loss", "The rank's own loss (last step)."),
    ("local_grad_norm", "local_grad_norm", "L2 norm of the rank's own gradient before the reduction (last step)."),
    ("local_nonfinite", "local_nonfinite", "NaN/Inf elements of the rank's own gradient before the reduction."),
    ("compute_time", "compute_seconds", "The rank's forward + backward time before waiting on the reduction."),
)
STATS = ("min", "median", "max")


class RankFamilies:
    """The per-rank families of one scrape, filled run by run."""

    def __init__(self, max_ranks: int) -> None:
        self.max_ranks = max_ranks
        labels = ["run", "rank"]
        self.per_rank = {
            attribute: GaugeMetricFamily(f"numwatch_rank_{suffix}", text, labels=labels)
            for attribute, suffix, text in SIGNALS
            if attribute != "loss"
        }
        self.across = {
            attribute: GaugeMetricFamily(
                f"numwatch_ranks_{suffix}",
                f"Minimum, median and maximum over the ranks: {text}",
                labels=["run", "stat"],
            )
            for attribute, suffix, text in SIGNALS
        }
        self.straggling = GaugeMetricFamily(
            "numwatch_rank_straggling",
            "1 while the rank is a straggler (compute time above the ranks' median by the factor for k steps).",
            labels=labels,
        )
        self.diverged = GaugeMetricFamily(
            "numwatch_rank_replica_diverged",
            "1 while the rank's replicated weights differ from the other ranks' (last sampled step).",
            labels=labels,
        )
        self.events = CounterMetricFamily(
            "numwatch_rank_events",
            "Cross-rank events (rank_nonfinite, rank_outlier, straggler, replica_divergence) by the first rank named.",
            labels=["run", "rank", "kind"],
        )
        self.missing = GaugeMetricFamily(
            "numwatch_ranks_missing", "Ranks that had not sent the last step judged across ranks.", labels=["run"]
        )

    def listed(self, run: Run, states: Sequence[RankState], judge: RankJudge | None) -> set[int]:
        """The ranks whose own series /metrics lists: all of them up to ``max_ranks``; beyond, those sending
        the replicated statistics and those the cross-rank detectors name now."""
        if run.world_size <= self.max_ranks:
            return {s.rank for s in states}
        state = (judge.state if judge is not None else None) or {}
        named = {int(rank) for rank in state.get("stragglers", [])} | {int(rank) for rank in state.get("diverged", [])}
        named |= {int(rank) for rank in state.get("nonfinite", [])}
        named |= {int(rank) for ranks in state.get("outliers", {}).values() for rank in ranks}
        return named | {s.rank for s in states if s.global_grad_norm is not None}

    def add_run(self, run: Run, states: Sequence[RankState], judge: RankJudge | None) -> dict[str, int]:
        """Add a run's families; the cross-rank events counted so far by kind (to add to numwatch_events_total)."""
        state = (judge.state if judge is not None else None) or {}
        listed = self.listed(run, states, judge)
        for attribute, _, _ in SIGNALS:
            having = [s for s in states if getattr(s, attribute) is not None]
            if not having:
                continue
            values = [float(getattr(s, attribute)) for s in having]
            for stat, value in zip(STATS, (min(values), statistics.median(values), max(values)), strict=True):
                self.across[attribute].add_metric([run.name, stat], value)
            family = self.per_rank.get(attribute)
            if family is None:
                continue
            extremes = {min(having, key=lambda s: getattr(s, attribute)).rank}
            extremes.add(max(having, key=lambda s: getattr(s, attribute)).rank)
            for s in having:
                if s.rank in listed or (run.world_size > self.max_ranks and s.rank in extremes):
                    family.add_metric([run.name, str(s.rank)], float(getattr(s, attribute)))
        for rank in state.get("stragglers", []):
            self.straggling.add_metric([run.name, str(rank)], 1.0)
        for rank in state.get("diverged", []):
            self.diverged.add_metric([run.name, str(rank)], 1.0)
        gaps = state.get("gaps", [])
        if judge is not None:
            last_gap = gaps[-1] if gaps else None
            missing = len(last_gap[2]) if last_gap and last_gap[1] == state.get("last") else 0
            self.missing.add_metric([run.name], float(missing))
        events = (judge.events_total if judge is not None else None) or {}
        for kind, counts in sorted(events.items()):
            for rank, count in sorted(counts.items(), key=lambda item: int(item[0])):
                self.events.add_metric([run.name, rank, kind], count)
        return {kind: sum(counts.values()) for kind, counts in events.items()}

    def families(self) -> list[Metric]:
        return [
            *self.per_rank.values(),
            *self.across.values(),
            self.straggling,
            self.diverged,
            self.missing,
            self.events,
        ]
