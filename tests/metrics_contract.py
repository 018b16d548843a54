"""The /metrics names the exposition promises (ARCHITECTURE §5, issue #4's table).

Alert rules and dashboards may reference only these (plus Prometheus's own ``up`` and
``ALERTS``); tests on both sides check against this one list.
"""

from __future__ import annotations

import re

GAUGES = (
    "numwatch_run_info",
    "numwatch_run_last_step",
    "numwatch_run_last_step_timestamp_seconds",
    "numwatch_loss",
    "numwatch_learning_rate",
    "numwatch_loss_scale",
    "numwatch_global_grad_norm",
    "numwatch_max_layer_grad_norm",
    "numwatch_layers_nonfinite",
    "numwatch_headroom_bits",
    "numwatch_grad_zero_ratio",
    "numwatch_grad_underflow_ratio",
    "numwatch_grad_subnormal_ratio",
    "numwatch_grad_overflow_ratio",
    "numwatch_stale_fraction",
    "numwatch_update_ratio",
    "numwatch_layer_grad_norm",
)
COUNTERS = (
    "numwatch_steps_total",
    "numwatch_skipped_steps_total",
    "numwatch_nonfinite_steps_total",
    "numwatch_nonfinite_loss_total",
    "numwatch_loss_scale_backoffs_total",
    "numwatch_loss_scale_growths_total",
    "numwatch_events_total",
    "numwatch_ingest_requests_total",
    "numwatch_ingest_rejected_batches_total",
    "numwatch_ingest_steps_total",
)
HISTOGRAMS = (
    "numwatch_global_grad_norm_distribution",
    "numwatch_ingest_write_latency_seconds",
)
# Series names as they appear in PromQL (histograms expand to three series each).
SERIES_NAMES: frozenset[str] = frozenset(
    GAUGES + COUNTERS + tuple(f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count"))
)
PROMETHEUS_OWN = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})

EVENT_KINDS = (
    "nonfinite_grad",
    "nonfinite_loss",
    "loss_scale_backoff",
    "loss_scale_growth",
    "skipped_step",
    "grad_explosion",
    "vanishing_grad",
    "underflow_high",
    "loss_scale_collapse",
    "nonfinite_origin",
    "monitoring_dropped",
)

_NUMWATCH_NAME = re.compile(r"\bnumwatch_[A-Za-z0-9_]+")


def unknown_metric_names(promql: str) -> set[str]:
    """``numwatch_*`` names in ``promql`` that the contract does not define."""
    return set(_NUMWATCH_NAME.findall(promql)) - SERIES_NAMES
