"""/metrics: run state from the database as Prometheus metric families, plus this process's ingest metrics.

The run-level families are built fresh at each scrape from ``runs`` and ``rank_state``
(a custom collector, not one Gauge child per series), so every replica sharing the
database answers the same, and a run that finished more than the grace period ago simply
stops appearing. Renders are cached briefly so scrapes cannot hammer the database.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, defer

from numwatch.monitor.detectors import spikes
from numwatch.monitor.metrics.ranks import RankFamilies
from numwatch.monitor.reads.queries import run_status
from numwatch.monitor.settings import Settings
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store.models import DELETING, GRAD_NORM_BUCKETS, RankJudge, RankState, Run
from numwatch.protocol import decode_float

RUN_LABELS = ("run", "rank")


class IngestMetrics:
    """This collector process's own ingest counters (summed across replicas by Prometheus)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "numwatch_ingest_requests", "Batch requests received by this collector process.", registry=registry
        )
        self.rejected_batches = Counter(
            "numwatch_ingest_rejected_batches", "Batches this process rejected (4xx).", registry=registry
        )
        self.steps = Counter("numwatch_ingest_steps", "Steps stored by this process.", registry=registry)
        self.write_latency = Histogram(
            "numwatch_ingest_write_latency_seconds",
            "Time to validate, store and commit one batch.",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )


def _finite_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


class NumwatchCollector(Collector):
    """Run-level metric families over the current database state."""

    def __init__(self, session_factory: Callable[[], Session], settings: Settings) -> None:
        self.session_factory = session_factory
        self.settings = settings
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None
        # A run's tensor schema never changes once registered: parse its JSON once per process.
        self._tensor_names: dict[int, list[str]] = {}

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.settings.metrics_cache_seconds:
                self._cached = (now, self._build())
            yield from self._cached[1]

    def _visible_runs(self, session: Session) -> list[Run]:
        cutoff = datetime.fromtimestamp(time.time() - self.settings.finished_grace_seconds, timezone.utc)
        return list(
            session.execute(
                select(Run)
                .options(defer(Run.tensors), defer(Run.config), defer(Run.modules))
                .where(
                    Run.status != DELETING,
                    or_(Run.status == "running", Run.finished_at.is_(None), Run.finished_at >= cutoff),
                )
                .order_by(Run.id)
            ).scalars()
        )

    def _build(self) -> list[Metric]:
        detect = self.settings.detect
        m = _Families(detect.spike_score_steps, detect.attention_logit_threshold, detect.gemm_sqnr_threshold)
        with self.session_factory() as session:
            runs = self._visible_runs(session)
            states = (
                session.execute(select(RankState).where(RankState.run_id.in_([r.id for r in runs]))).scalars().all()
                if runs
                else []
            )
            by_run: dict[int, list[RankState]] = {}
            for state in states:
                by_run.setdefault(state.run_id, []).append(state)
            ranks = RankFamilies(self.settings.metrics_max_ranks)
            judges = {
                judge.run_id: judge
                for judge in session.execute(select(RankJudge).where(RankJudge.run_id.in_([r.id for r in runs])))
                .scalars()
                .all()
            }
            now = time.time()
            for run in runs:
                run_states = by_run.get(run.id, [])
                status = run_status(run, run_states, self.settings.stale_after_seconds, now)
                m.run_info.add_metric([run.name, run.project, run.format, str(run.world_size), status], 1)
                events: dict[str, int] = {}
                listed = ranks.listed(run, run_states, judges.get(run.id))
                for state in run_states:
                    for kind, count in state.events_total.items():
                        events[kind] = events.get(kind, 0) + count
                    if state.rank not in listed:
                        continue  # a large job's rank with nothing to single it out: in numwatch_ranks_*
                    m.add_rank(run, state)
                    # A rank whose steps carry no per-tensor statistics (another rank sends them) has no top layers.
                    if self.settings.metrics_top_k > 0 and state.global_grad_norm is not None:
                        self._top_layers(session, run, state, m.layer_grad_norm)
                if run.world_size > 1:
                    for kind, count in ranks.add_run(run, run_states, judges.get(run.id)).items():
                        events[kind] = events.get(kind, 0) + count
                for kind, count in sorted(events.items()):
                    m.events.add_metric([run.name, kind], count)
        return m.families() + ranks.families()

    def _names(self, session: Session, run_id: int) -> list[str]:
        if run_id not in self._tensor_names:
            tensors = session.execute(select(Run.tensors).where(Run.id == run_id)).scalar_one()
            self._tensor_names[run_id] = [tensor["name"] for tensor in tensors]
        return self._tensor_names[run_id]

    def _top_layers(self, session: Session, run: Run, state: RankState, family: GaugeMetricFamily) -> None:
        names = self._names(session, run.id)
        row = step_blocks.Reader(session, run.id, state.rank, len(names)).find(state.last_step, wanted=("grad_norm",))
        if row is None or "grad_norm" not in row["tensors"]:
            return
        norms = row["tensors"]["grad_norm"].astype(np.float64)
        # NaN sorts as the largest: the tensors that went non-finite are the ones to show.
        order = np.argsort(np.where(np.isnan(norms), np.inf, norms))[::-1][: self.settings.metrics_top_k]
        for index in order:
            family.add_metric([run.name, str(state.rank), names[index]], float(norms[index]))


class _Families:
    """The families of one scrape, filled run by run."""

    def __init__(self, score_steps: int, attention_logit_threshold: float, gemm_sqnr_threshold: float) -> None:
        self.score_steps = score_steps
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        self.run_info = gauge(
            "numwatch_run_info",
            "A run numwatch knows about (value 1).",
            labels=["run", "project", "format", "world_size", "status"],
        )
        self.scalar_gauges = {
            "last_step": gauge("numwatch_run_last_step", "Highest step stored.", labels=RUN_LABELS),
            "last_step_time": gauge(
                "numwatch_run_last_step_timestamp_seconds",
                "Wall time (epoch s) of the highest step stored.",
                labels=RUN_LABELS,
            ),
            "loss": gauge("numwatch_loss", "Loss of the last step (NaN allowed).", labels=RUN_LABELS),
            "loss_scale": gauge("numwatch_loss_scale", "Loss scale after the last step.", labels=RUN_LABELS),
            "global_grad_norm": gauge(
                "numwatch_global_grad_norm", "Global gradient L2 norm of the last step (unscaled).", labels=RUN_LABELS
            ),
            "max_layer_grad_norm": gauge(
                "numwatch_max_layer_grad_norm", "Largest per-tensor gradient norm of the last step.", labels=RUN_LABELS
            ),
            "layers_nonfinite": gauge(
                "numwatch_layers_nonfinite", "Tensors with NaN/Inf gradients at the last step.", labels=RUN_LABELS
            ),
            "headroom_bits": gauge(
                "numwatch_headroom_log2",
                "Headroom in powers of two (bits of exponent): log2(format max / (scale x max grad abs-max)) at the "
                "last step; promtool rejects a _bits suffix.",
                labels=RUN_LABELS,
            ),
            "stale_fraction": gauge(
                "numwatch_stale_fraction",
                "Mean share of weights that did not move although their gradient was non-zero (last sampled step).",
                labels=RUN_LABELS,
            ),
            "update_ratio": gauge(
                "numwatch_update_ratio", "Mean ||dw||/||w|| over tensors (last sampled step).", labels=RUN_LABELS
            ),
            "adam_update_rms": gauge(
                "numwatch_adam_update_rms",
                "Mean over tensors of the RMS of Adam's update before the learning rate, m_hat/(sqrt(v_hat)+eps) "
                "(last sampled step).",
                labels=RUN_LABELS,
            ),
            "adam_eps_dominated": gauge(
                "numwatch_adam_eps_dominated",
                "Mean over tensors of the share of elements where Adam's eps exceeds sqrt(v_hat) (last sampled step).",
                labels=RUN_LABELS,
            ),
            "attention_logit_max": gauge(
                "numwatch_attention_logit_max",
                "Largest pre-softmax attention logit scale*q.k over attention calls, batch, heads and unmasked "
                "positions (last measured forward; NaN allowed).",
                labels=RUN_LABELS,
            ),
            "log_z_mean": gauge(
                "numwatch_output_log_z_mean",
                "Mean over tokens of log Z = logsumexp of the output logits over the vocabulary (last measured "
                "forward).",
                labels=RUN_LABELS,
            ),
            "log_z_max": gauge(
                "numwatch_output_log_z_max", "Largest log Z over tokens (last measured forward).", labels=RUN_LABELS
            ),
            "output_logit_absmax": gauge(
                "numwatch_output_logit_absmax", "Largest |output logit| (last measured forward).", labels=RUN_LABELS
            ),
        }
        self.attention_logit_threshold = gauge(
            "numwatch_attention_logit_threshold",
            "The collector's attention_logit_growth threshold (NUMWATCH_DETECT_ATTENTION_LOGIT_THRESHOLD), which the "
            "alert compares with.",
        )
        self.attention_logit_threshold.add_metric([], attention_logit_threshold)
        self.gemm_sqnr_threshold = gauge(
            "numwatch_gemm_sqnr_threshold_decibels",
            "The collector's gemm_sqnr_low threshold (NUMWATCH_DETECT_GEMM_SQNR_THRESHOLD), "
            "which the alert compares with.",
        )
        self.gemm_sqnr_threshold.add_metric([], gemm_sqnr_threshold)
        self.counters = {
            "steps_total": counter("numwatch_steps", "Optimizer-step attempts stored.", labels=RUN_LABELS),
            "skipped_steps_total": counter(
                "numwatch_skipped_steps", "Steps the GradScaler skipped.", labels=RUN_LABELS
            ),
            "clipped_steps_total": counter(
                "numwatch_clipped_steps",
                "Steps whose gradients a clip function scaled down (clip_coef below 1, or not finite); with "
                "numwatch_steps_total, the clipping rate.",
                labels=RUN_LABELS,
            ),
            "nonfinite_steps_total": counter(
                "numwatch_nonfinite_steps",
                "Steps whose non-finite gradients reached the optimizer (GradScaler-skipped overflows count as "
                "skipped steps instead).",
                labels=RUN_LABELS,
            ),
            "nonfinite_loss_total": counter(
                "numwatch_nonfinite_loss", "Steps whose loss was NaN or Inf.", labels=RUN_LABELS
            ),
            "loss_scale_backoffs_total": counter(
                "numwatch_loss_scale_backoffs", "GradScaler backoffs.", labels=RUN_LABELS
            ),
            "loss_scale_growths_total": counter(
                "numwatch_loss_scale_growths", "GradScaler growths.", labels=RUN_LABELS
            ),
        }
        self.ratios = {
            name: gauge(
                f"numwatch_grad_{name}",
                f"Share of gradient elements whose cast to the run's format is {what} (last step with format counts).",
                labels=[*RUN_LABELS, "format"],
            )
            for name, what in (
                ("zero_ratio", "zero already"),
                ("underflow_ratio", "flushed to zero"),
                ("subnormal_ratio", "subnormal"),
                ("overflow_ratio", "overflowing"),
            )
        }
        self.spike_score = gauge(
            "numwatch_spike_score",
            "Share of spikes (above mean + k sigma of the last W values) among the signal's last N judged values; 0 "
            "before any is judged.",
            labels=[*RUN_LABELS, "signal"],
        )
        self.quant_sqnr_min = gauge(
            "numwatch_quant_sqnr_min_decibels",
            "Lowest SQNR over the weight tensors if quantized with the scheme, 20 log10(||w||/||w - Q(w)||) (last "
            "quantization step).",
            labels=[*RUN_LABELS, "scheme"],
        )
        self.gemm_sqnr_min = gauge(
            "numwatch_gemm_sqnr_min_decibels",
            "Lowest SQNR over the Linear layers of a matmul operand (x input, w weight, dy output gradient) under a "
            "low-precision scheme, 10 log10(sum x^2 / sum (x - Q(x))^2) (last step whose matmuls were measured).",
            labels=[*RUN_LABELS, "operand", "scheme"],
        )
        self.learning_rate = gauge(
            "numwatch_learning_rate",
            "Learning rate of each param group at the last step.",
            labels=[*RUN_LABELS, "group"],
        )
        self.grad_norm_distribution = HistogramMetricFamily(
            "numwatch_global_grad_norm_distribution", "Global gradient norms of all stored steps.", labels=RUN_LABELS
        )
        self.layer_grad_norm = gauge(
            "numwatch_layer_grad_norm",
            "Per-tensor gradient norm at the last step, top-k tensors by norm.",
            labels=[*RUN_LABELS, "tensor"],
        )
        self.events = counter("numwatch_events", "Events stored, by kind.", labels=["run", "kind"])

    def add_rank(self, run: Run, state: RankState) -> None:
        labels = [run.name, str(state.rank)]
        for attribute, family in self.scalar_gauges.items():
            value = getattr(state, attribute)
            if value is not None:
                family.add_metric(labels, float(value))
        for attribute, counter in self.counters.items():
            counter.add_metric(labels, getattr(state, attribute))
        for attribute, family in self.ratios.items():
            value = getattr(state, attribute)
            if value is not None:
                family.add_metric([*labels, run.format], float(value))
        for signal in spikes.SIGNALS:
            self.spike_score.add_metric(
                [*labels, signal], spikes.score((state.spike_state or {}).get(signal, spikes.EMPTY), self.score_steps)
            )
        for scheme, value in sorted((state.quant_sqnr_min or {}).items()):
            self.quant_sqnr_min.add_metric([*labels, scheme], _finite_or_nan(decode_float(value)))
        for pair, value in sorted(((state.gemm_state or {}).get("sqnr_min") or {}).items()):
            operand, scheme = pair.split(":")
            self.gemm_sqnr_min.add_metric([*labels, operand, scheme], _finite_or_nan(decode_float(value)))
        for group, lr in enumerate(state.lr or []):
            self.learning_rate.add_metric([*labels, str(group)], _finite_or_nan(decode_float(lr)))
        counts = np.cumsum(
            np.asarray(state.grad_norm_bucket_counts or [0] * (len(GRAD_NORM_BUCKETS) + 1), dtype=np.int64)
        )
        if counts[-1] == 0 and state.steps_total > 0:
            return  # steps without a global norm: another rank sends the replicated statistics
        buckets = [(repr(bound), int(count)) for bound, count in zip(GRAD_NORM_BUCKETS, counts[:-1], strict=True)] + [
            ("+Inf", int(counts[-1]))
        ]
        self.grad_norm_distribution.add_metric(labels, buckets, sum_value=state.grad_norm_sum)

    def families(self) -> list[Metric]:
        return [
            self.run_info,
            *self.scalar_gauges.values(),
            self.attention_logit_threshold,
            self.gemm_sqnr_threshold,
            *self.counters.values(),
            *self.ratios.values(),
            self.spike_score,
            self.quant_sqnr_min,
            self.gemm_sqnr_min,
            self.learning_rate,
            self.grad_norm_distribution,
            self.layer_grad_norm,
            self.events,
        ]
