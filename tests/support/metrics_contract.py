"""The /metrics names the exposition promises: the contract between the collector, the alert rules and the dashboards.

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
    "numwatch_headroom_log2",
    "numwatch_grad_zero_ratio",
    "numwatch_grad_underflow_ratio",
    "numwatch_grad_subnormal_ratio",
    "numwatch_grad_overflow_ratio",
    "numwatch_stale_fraction",
    "numwatch_update_ratio",
    "numwatch_layer_grad_norm",
    "numwatch_spike_score",
    "numwatch_adam_update_rms",
    "numwatch_adam_eps_dominated",
    "numwatch_quant_sqnr_min_decibels",
    "numwatch_gemm_sqnr_min_decibels",
    "numwatch_gemm_sqnr_threshold_decibels",
    "numwatch_attention_logit_max",
    "numwatch_attention_logit_threshold",
    "numwatch_output_log_z_mean",
    "numwatch_output_log_z_max",
    "numwatch_output_logit_absmax",
    # multi-rank runs
    "numwatch_rank_local_grad_norm",
    "numwatch_rank_local_nonfinite",
    "numwatch_rank_compute_seconds",
    "numwatch_ranks_loss",
    "numwatch_ranks_local_grad_norm",
    "numwatch_ranks_local_nonfinite",
    "numwatch_ranks_compute_seconds",
    "numwatch_rank_straggling",
    "numwatch_rank_replica_diverged",
    "numwatch_ranks_missing",
)
COUNTERS = (
    "numwatch_steps_total",
    "numwatch_skipped_steps_total",
    "numwatch_clipped_steps_total",
    "numwatch_nonfinite_steps_total",
    "numwatch_nonfinite_loss_total",
    "numwatch_loss_scale_backoffs_total",
    "numwatch_loss_scale_growths_total",
    "numwatch_events_total",
    "numwatch_rank_events_total",
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

_NUMWATCH_NAME = re.compile(r"\bnumwatch_[A-Za-z0-9_]+")


def unknown_metric_names(promql: str) -> set[str]:
    """``numwatch_*`` names in ``promql`` that the contract does not define."""
    return set(_NUMWATCH_NAME.findall(promql)) - SERIES_NAMES


def sample_exposition(run: str, now: float, nonfinite_steps: int = 1) -> str:
    """A /metrics text with one series of every contract metric for a healthy fp16 run
    ``run`` on rank 0, except ``nonfinite_steps`` steps with NaN gradients.

    It stands in for the collector's exposition where the rules and dashboards are
    tested on their own.
    """
    run_rank = f'run="{run}",rank="0"'
    lines: list[str] = []

    def family(name: str, kind: str, samples: list[tuple[str, str, float]]) -> None:
        lines.append(f"# HELP {name} numwatch contract metric {name}.")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(
            f"{name}{suffix}{{{labels}}} {value!r}" if labels else f"{name}{suffix} {value!r}"
            for suffix, labels, value in samples
        )

    family(
        "numwatch_run_info",
        "gauge",
        [("", f'run="{run}",project="demo",format="fp16",world_size="1",status="running"', 1.0)],
    )
    gauges = {
        "numwatch_run_last_step": 120.0,
        "numwatch_run_last_step_timestamp_seconds": now,
        "numwatch_loss": 2.5,
        "numwatch_loss_scale": 32768.0,
        "numwatch_global_grad_norm": 0.75,
        "numwatch_max_layer_grad_norm": 0.5,
        "numwatch_layers_nonfinite": 0.0,
        "numwatch_headroom_log2": 6.0,
        "numwatch_stale_fraction": 0.01,
        "numwatch_update_ratio": 0.001,
        "numwatch_adam_update_rms": 0.3,
        "numwatch_adam_eps_dominated": 0.0,
    }
    for name, value in gauges.items():
        family(name, "gauge", [("", run_rank, value)])
    family("numwatch_learning_rate", "gauge", [("", f'{run_rank},group="0"', 3e-4)])
    for name in (
        "numwatch_grad_zero_ratio",
        "numwatch_grad_underflow_ratio",
        "numwatch_grad_subnormal_ratio",
        "numwatch_grad_overflow_ratio",
    ):
        family(name, "gauge", [("", f'{run_rank},format="fp16"', 0.001)])
    family(
        "numwatch_spike_score",
        "gauge",
        [("", f'{run_rank},signal="{signal}"', 0.0) for signal in ("loss", "grad_norm")],
    )
    family(
        "numwatch_quant_sqnr_min_decibels",
        "gauge",
        [
            ("", f'{run_rank},scheme="{scheme}"', value)
            for scheme, value in (("int8", 38.0), ("int4", 17.5), ("nf4", 20.0), ("fp8", 31.0))
        ],
    )
    family(
        "numwatch_gemm_sqnr_min_decibels",
        "gauge",
        [
            ("", f'{run_rank},operand="{operand}",scheme="{scheme}"', value)
            for operand, scheme, value in (("x", "e4m3", 31.0), ("w", "e4m3", 31.5), ("dy", "e5m2", 25.5))
        ],
    )
    family("numwatch_gemm_sqnr_threshold_decibels", "gauge", [("", "", 20.0)])
    family(
        "numwatch_layer_grad_norm",
        "gauge",
        [("", f'{run_rank},tensor="fc{i}.weight"', 0.1 * (i + 1)) for i in range(3)],
    )
    counters = {
        "numwatch_steps_total": 121.0,
        "numwatch_skipped_steps_total": float(nonfinite_steps),
        "numwatch_clipped_steps_total": 12.0,
        "numwatch_nonfinite_steps_total": float(nonfinite_steps),
        "numwatch_nonfinite_loss_total": 0.0,
        "numwatch_loss_scale_backoffs_total": float(nonfinite_steps),
        "numwatch_loss_scale_growths_total": 0.0,
    }
    for name, value in counters.items():
        family(name, "counter", [("", run_rank, value)])
    family("numwatch_events_total", "counter", [("", f'run="{run}",kind="nonfinite_grad"', float(nonfinite_steps))])
    # A healthy job's rank 1, beside rank 0: every rank's own health, nobody named by a cross-rank detector.
    for rank in ("0", "1"):
        labels = f'run="{run}",rank="{rank}"'
        for name, value in (
            ("numwatch_rank_local_grad_norm", 0.8),
            ("numwatch_rank_local_nonfinite", 0.0),
            ("numwatch_rank_compute_seconds", 0.2),
        ):
            family(name, "gauge", [("", labels, value)])
    for name, value in (
        ("numwatch_ranks_loss", 2.5),
        ("numwatch_ranks_local_grad_norm", 0.8),
        ("numwatch_ranks_local_nonfinite", 0.0),
        ("numwatch_ranks_compute_seconds", 0.2),
    ):
        family(name, "gauge", [("", f'run="{run}",stat="{stat}"', value) for stat in ("min", "median", "max")])
    family("numwatch_rank_straggling", "gauge", [])
    family("numwatch_rank_replica_diverged", "gauge", [])
    family("numwatch_ranks_missing", "gauge", [("", f'run="{run}"', 0.0)])
    family("numwatch_rank_events_total", "counter", [])
    # All 121 global norms fell in the (0.1, 1] bucket.
    buckets = [(bound, 0.0 if bound < 1.0 else 121.0) for bound in (10.0**e for e in range(-8, 9))]
    family(
        "numwatch_global_grad_norm_distribution",
        "histogram",
        [("_bucket", f'{run_rank},le="{bound!r}"', count) for bound, count in buckets]
        + [("_bucket", f'{run_rank},le="+Inf"', 121.0), ("_sum", run_rank, 90.0), ("_count", run_rank, 121.0)],
    )
    for name, value in (("requests", 10.0), ("rejected_batches", 0.0), ("steps", 121.0)):
        family(f"numwatch_ingest_{name}_total", "counter", [("", "", value)])
    family(
        "numwatch_ingest_write_latency_seconds",
        "histogram",
        [("_bucket", 'le="0.01"', 10.0), ("_bucket", 'le="+Inf"', 10.0), ("_sum", "", 0.02), ("_count", "", 10.0)],
    )
    return "\n".join(lines) + "\n"
