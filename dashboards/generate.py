"""Generates numwatch's Grafana dashboards (the committed JSON files are its output).

    python dashboards/generate.py          # rewrites dashboards/*.json

Prometheus panels read the collector's /metrics names; per-layer heatmaps, exponent
histograms and the events table read the collector's JSON API through the Infinity
datasource plugin (per-tensor data are stored packed, which SQL cannot unpack). The
format ranges drawn on the exponent histograms come from ``torch.finfo``.

The models are plain dictionaries: Grafana's typed builders (``grafana-foundation-sdk``
10.1) have no Infinity query type (the heatmap, exponent histograms, events table, tensor
variable and events annotation use one), no ``definition`` on a query variable, no
``step``/``titleFormat``/``textFormat`` on an annotation, no tooltip ``mode`` on a heatmap,
and a fixed ``schemaVersion`` of 36.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from numwatch import protocol

DASHBOARDS_DIR = Path(__file__).resolve().parent
PROMETHEUS = {"type": "prometheus", "uid": "numwatch-prometheus"}
COLLECTOR = {"type": "yesoreyeram-infinity-datasource", "uid": "numwatch-collector"}
RUN_DASHBOARD_UID = "numwatch-run"
OVERVIEW_DASHBOARD_UID = "numwatch-overview"
SCHEMA_VERSION = 39
GRID_WIDTH = 24
# Run-level series are identical on every collector replica: drop `instance` so two
# scraped replicas draw one line.
RUN_SELECTOR = '{run="$run", rank=~"$rank"}'
# The selected run in the collector's API (a Grafana variable in the path).
RUN_API = protocol.RUNS_PATH + "/${run}"
HISTOGRAM_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}
Panel = dict[str, Any]


def dedup(expr: str) -> str:
    """``expr`` with the scraping replica aggregated away."""
    return f"max without(instance) ({expr})"


def run_metric(name: str) -> str:
    """A contract metric of the selected run and ranks, one series per rank."""
    return dedup(f"{name}{RUN_SELECTOR}")


def prom(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    """A Prometheus query target."""
    target: dict[str, Any] = {"datasource": PROMETHEUS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        target.update(instant=True, range=False, format="table")
    return target


def collector(path: str, columns: list[tuple[str, str]], **extra: Any) -> dict[str, Any]:
    """An Infinity query of the collector's JSON API; ``columns`` are (selector, type) pairs."""
    return {
        "datasource": COLLECTOR,
        "type": "json",
        "source": "url",
        "format": "table",
        "parser": "backend",
        "url": path,
        "url_options": {"method": "GET", "data": ""},
        "root_selector": "",
        "columns": [{"selector": selector, "text": selector, "type": kind} for selector, kind in columns],
        **extra,
    }


def panel(
    kind: str, title: str, targets: list[dict[str, Any]], width: int = 12, height: int = 8, **extra: Any
) -> Panel:
    """A panel of visualisation ``kind``; ``extra`` adds fieldConfig/options/etc."""
    refs = "ABCDEFGHIJ"
    for ref, target in zip(refs, targets, strict=False):  # refs has letters to spare
        target["refId"] = ref
    datasource = targets[0]["datasource"] if targets else PROMETHEUS
    return {
        "type": kind,
        "title": title,
        "datasource": datasource,
        "targets": targets,
        "gridPos": {"w": width, "h": height},
        **extra,
    }


def timeseries(
    title: str, targets: list[dict[str, Any]], unit: str = "short", log_base: int | None = None, **extra: Any
) -> Panel:
    """A time-series panel, optionally on a log axis (norms and loss scales span decades)."""
    custom: dict[str, Any] = {"drawStyle": "line", "showPoints": "never", "spanNulls": False}
    if log_base:
        custom["scaleDistribution"] = {"type": "log", "log": log_base}
    defaults = {"unit": unit, "custom": custom}
    return panel("timeseries", title, targets, fieldConfig={"defaults": defaults, "overrides": []}, **extra)


def layout(panels: list[Panel]) -> list[Panel]:
    """Place panels left to right, wrapping at the grid width; assigns ids."""
    x = y = row_height = 0
    for panel_id, item in enumerate(panels, start=1):
        grid = item["gridPos"]
        if x + grid["w"] > GRID_WIDTH:
            x, y, row_height = 0, y + row_height, 0
        grid.update(x=x, y=y)
        x += grid["w"]
        row_height = max(row_height, grid["h"])
        item["id"] = panel_id
    return panels


def dashboard(
    uid: str, title: str, panels: list[Panel], templating: list[dict[str, Any]], annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    """A complete dashboard model as Grafana's API and file provisioning accept it."""
    builtin = {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }
    return {
        "uid": uid,
        "title": title,
        "tags": ["numwatch"],
        "timezone": "browser",
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "links": [],
        "annotations": {"list": [builtin, *annotations]},
        "templating": {"list": templating},
        "panels": layout(panels),
    }


# --- format ranges (from torch.finfo) -------------------------------------------


@dataclass(frozen=True)
class FormatBinades:
    """floor(log2|x|) of a format's smallest subnormal, smallest normal and largest value."""

    name: str
    min_subnormal: int
    min_normal: int
    max: int


def binade(value: float) -> int:
    """floor(log2(value)) for a positive float, exact (no log rounding)."""
    _, exponent = math.frexp(value)
    return exponent - 1


def format_binades(name: str, dtype: torch.dtype) -> FormatBinades:
    """The binade boundaries of ``dtype``; the smallest subnormal is smallest_normal·eps."""
    info = torch.finfo(dtype)
    return FormatBinades(name, binade(info.smallest_normal * info.eps), binade(info.smallest_normal), binade(info.max))


def region_expression(fmt: FormatBinades) -> str:
    """Infinity computed-column expression classifying a binade against ``fmt``:
    0 flushed to zero, 1 subnormal (precision lost), 2 normal, 3 overflows."""
    return f"binade < {fmt.min_subnormal} ? 0 : (binade < {fmt.min_normal} ? 1 : (binade <= {fmt.max} ? 2 : 3))"


REGION_STEPS = [
    {"color": "red", "value": None},
    {"color": "orange", "value": 1},
    {"color": "green", "value": 2},
    {"color": "red", "value": 3},
]


def exponent_histogram(fmt: FormatBinades, kind: str) -> Panel:
    """Bar chart of a tensor's exponent histogram, bars coloured by ``fmt``'s range."""
    region = f"{fmt.name}_range"
    target = collector(
        f"{RUN_API}/histograms?tensor=${{tensor}}&kind={kind}",
        [("binade", "number"), ("count", "number")],
        root_selector="exponent",
        computed_columns=[{"selector": region_expression(fmt), "text": region, "type": "number"}],
    )
    description = (
        f"Counts per binade floor(log2|x|) of {kind} elements (latest sampled step). Bar colours: red below "
        f"2^{fmt.min_subnormal} (flushes to zero in {fmt.name}), orange 2^{fmt.min_subnormal}..2^{fmt.min_normal - 1} "
        f"({fmt.name} subnormal), green up to 2^{fmt.max} ({fmt.name} normal), red above (overflow). Multiply by the "
        "loss scale to compare scaled fp16 gradients."
    )
    return panel(
        "barchart",
        f"Exponent histogram of {kind}s vs {fmt.name} ({'$tensor'})",
        [target],
        description=description,
        fieldConfig={
            "defaults": {"color": {"mode": "thresholds"}, "thresholds": {"mode": "absolute", "steps": REGION_STEPS}},
            "overrides": [],
        },
        options={"xField": "binade", "colorByField": region, "showValue": "never", "legend": {"showLegend": False}},
    )


# --- the two dashboards -----------------------------------------------------------


def prometheus_variable(name: str, query: str, multi: bool = False) -> dict[str, Any]:
    """A template variable filled by a Prometheus label_values query."""
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": PROMETHEUS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        **({"allValue": ".*", "current": {"text": "All", "value": "$__all"}} if multi else {}),
    }


def tensor_variable() -> dict[str, Any]:
    """Tensor names of the run, from the collector's heatmap endpoint (the schema's names)."""
    return {
        "name": "tensor",
        "label": "tensor",
        "type": "query",
        "datasource": COLLECTOR,
        "query": {
            "infinityQuery": collector(f"{RUN_API}/heatmap?stat=grad_norm&max_steps=1", [("tensor", "string")]),
            "query": "",
            "queryType": "infinity",
        },
        "refresh": 2,
        "multi": False,
        "includeAll": False,
    }


def steps_in(counter: str) -> str:
    """Steps counted by ``counter`` per panel interval, for the selected run and ranks."""
    return dedup(f"increase({counter}{RUN_SELECTOR}[$__rate_interval])")


def build_run_dashboard() -> dict[str, Any]:
    """One run in depth (uid numwatch-run, variables run/rank/tensor)."""
    norm_buckets = dedup(f"rate(numwatch_global_grad_norm_distribution_bucket{RUN_SELECTOR}[$__rate_interval])")
    panels = [
        timeseries("Loss", [prom(run_metric("numwatch_loss"), "rank {{rank}}")]),
        timeseries(
            "Global gradient norm",
            [
                prom(run_metric("numwatch_global_grad_norm"), "last, rank {{rank}}"),
                prom(run_metric("numwatch_max_layer_grad_norm"), "largest layer, rank {{rank}}"),
                prom(f"histogram_quantile(0.5, {norm_buckets})", "p50 of all steps, rank {{rank}}"),
                prom(f"histogram_quantile(0.99, {norm_buckets})", "p99 of all steps, rank {{rank}}"),
            ],
            log_base=10,
        ),
        timeseries("Loss scale", [prom(run_metric("numwatch_loss_scale"), "scale, rank {{rank}}")], log_base=2),
        timeseries(
            "Loss-scale decisions and skipped steps",
            [
                prom(steps_in("numwatch_loss_scale_backoffs_total"), "backoffs, rank {{rank}}"),
                prom(steps_in("numwatch_loss_scale_growths_total"), "growths, rank {{rank}}"),
                prom(steps_in("numwatch_skipped_steps_total"), "skipped steps, rank {{rank}}"),
            ],
        ),
        timeseries(
            "Non-finite",
            [
                prom(steps_in("numwatch_nonfinite_steps_total"), "steps with NaN/Inf grads, rank {{rank}}"),
                prom(steps_in("numwatch_nonfinite_loss_total"), "steps with NaN/Inf loss, rank {{rank}}"),
                prom(run_metric("numwatch_layers_nonfinite"), "layers non-finite now, rank {{rank}}"),
            ],
        ),
        timeseries(
            "Gradient elements lost in the training format",
            [
                prom(run_metric(f"numwatch_grad_{outcome}_ratio"), f"{outcome} {{{{format}}}}, rank {{{{rank}}}}")
                for outcome in ("underflow", "subnormal", "overflow", "zero")
            ],
            unit="percentunit",
        ),
        timeseries("Headroom to overflow", [prom(run_metric("numwatch_headroom_log2"), "rank {{rank}}")], unit="bits"),
        timeseries(
            "Top layers by gradient norm (last step)",
            [prom(f"topk(10, {run_metric('numwatch_layer_grad_norm')})", "{{tensor}} (rank {{rank}})")],
            log_base=10,
        ),
        timeseries(
            "Update ratio and stale fraction (sampled steps)",
            [
                prom(run_metric("numwatch_update_ratio"), "update ratio ‖Δw‖/‖w‖, rank {{rank}}"),
                prom(run_metric("numwatch_stale_fraction"), "stale fraction, rank {{rank}}"),
            ],
            log_base=10,
        ),
        timeseries("Learning rate", [prom(run_metric("numwatch_learning_rate"), "group {{group}}, rank {{rank}}")]),
        timeseries(
            "Adam: update RMS before the learning rate, share where eps dominates (sampled steps)",
            [
                prom(run_metric("numwatch_adam_update_rms"), "update RMS, rank {{rank}}"),
                prom(run_metric("numwatch_adam_eps_dominated"), "eps-dominated share, rank {{rank}}"),
            ],
            log_base=10,
        ),
        timeseries(
            "Quantization readiness: lowest SQNR over weight tensors (dB)",
            [prom(run_metric("numwatch_quant_sqnr_min_decibels"), "{{scheme}}, rank {{rank}}")],
            unit="dB",
        ),
        timeseries(
            "Spike score (share of spikes among the recent judged steps)",
            [prom(run_metric("numwatch_spike_score"), "{{signal}}, rank {{rank}}")],
            unit="percentunit",
            width=24,
        ),
        timeseries(
            "Ranks: each rank's own gradient norm before the all-reduce (multi-rank runs)",
            [
                prom(run_metric("numwatch_rank_local_grad_norm"), "rank {{rank}}"),
                prom(dedup('numwatch_ranks_local_grad_norm{run="$run"}'), "{{stat}} over all ranks"),
            ],
            log_base=10,
        ),
        timeseries(
            "Ranks: compute time before the reduction; stragglers and diverged replicas",
            [
                prom(run_metric("numwatch_rank_compute_seconds"), "rank {{rank}}"),
                prom(dedup('numwatch_ranks_compute_seconds{run="$run"}'), "{{stat}} over all ranks"),
                prom(run_metric("numwatch_rank_straggling"), "straggler: rank {{rank}}"),
                prom(run_metric("numwatch_rank_replica_diverged"), "weights diverged: rank {{rank}}"),
            ],
            unit="s",
        ),
        timeseries(
            "Max attention logit (sampled forwards)",
            [
                prom(run_metric("numwatch_attention_logit_max"), "largest over attention calls, rank {{rank}}"),
                prom("max(numwatch_attention_logit_threshold)", "alert threshold"),
            ],
            log_base=10,
        ),
        timeseries(
            "Output logits: log Z = logsumexp over the vocabulary (sampled forwards)",
            [
                prom(run_metric("numwatch_output_log_z_mean"), "mean log Z, rank {{rank}}"),
                prom(run_metric("numwatch_output_log_z_max"), "largest log Z, rank {{rank}}"),
                prom(run_metric("numwatch_output_logit_absmax"), "largest |logit|, rank {{rank}}"),
            ],
        ),
        panel(
            "heatmap",
            "Per-layer gradient norm",
            [
                collector(
                    f"{RUN_API}/heatmap?stat=grad_norm",
                    [("step", "number"), ("tensor", "string"), ("value", "number")],
                )
            ],
            width=24,
            height=12,
            transformations=[
                {
                    "id": "groupingToMatrix",
                    "options": {"columnField": "tensor", "rowField": "step", "valueField": "value"},
                },
                {
                    "id": "convertFieldType",
                    "options": {"conversions": [{"targetField": "step\\tensor", "destinationType": "number"}]},
                },
            ],
            options={
                "calculate": False,
                "yAxis": {"axisPlacement": "left"},
                "color": {"mode": "scheme", "scheme": "Spectral", "scale": "exponential", "exponent": 0.5},
                "cellGap": 0,
                "rowsFrame": {"layout": "unknown"},
                "tooltip": {"mode": "single", "yHistogram": False},
            },
        ),
        *(exponent_histogram(format_binades(name, dtype), "grad") for name, dtype in HISTOGRAM_FORMATS.items()),
        exponent_histogram(format_binades("bf16", torch.bfloat16), "weight"),
        panel(
            "table",
            "Events",
            [
                collector(
                    f"{RUN_API}/events",
                    [
                        ("time_ms", "timestamp_epoch"),
                        ("step", "number"),
                        ("rank", "number"),
                        ("kind", "string"),
                        ("details", "string"),
                    ],
                )
            ],
            width=12,
            height=10,
            options={"sortBy": [{"displayName": "step", "desc": True}]},
        ),
    ]
    templating = [
        prometheus_variable("run", "label_values(numwatch_run_info, run)"),
        prometheus_variable("rank", 'label_values(numwatch_run_last_step{run="$run"}, rank)', multi=True),
        tensor_variable(),
    ]
    annotations = [
        {
            # Posted by numwatch.monitor.metrics.annotations.AnnotationSink, tagged [numwatch, kind, run].
            "name": "numwatch annotations",
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "iconColor": "purple",
            "target": {"type": "tags", "tags": ["numwatch", "$run"], "matchAny": False, "limit": 200},
        },
        {
            "name": "Loss-scale backoffs",
            "datasource": PROMETHEUS,
            "enable": True,
            "iconColor": "orange",
            "expr": dedup('increase(numwatch_loss_scale_backoffs_total{run="$run"}[1m]) > 0'),
            "step": "1m",
            "titleFormat": "loss-scale backoff",
            "textFormat": "rank {{rank}}",
        },
        {
            "name": "numwatch events",
            "datasource": COLLECTOR,
            "enable": True,
            "iconColor": "red",
            "target": collector(
                f"{RUN_API}/events",
                [("time_ms", "timestamp_epoch"), ("kind", "string"), ("step", "number")],
                refId="events",
            ),
        },
    ]
    return dashboard(RUN_DASHBOARD_UID, "numwatch run", panels, templating, annotations)


def build_overview_dashboard() -> dict[str, Any]:
    """All live runs: status, progress, key numerics, firing alerts, events, collector health."""
    run_link = [{"title": "Open run", "url": f"/d/{RUN_DASHBOARD_UID}/numwatch-run?var-run=${{__data.fields.run}}"}]
    by_run = "{{run}} rank {{rank}}"
    panels = [
        panel(
            "table",
            "Runs",
            [
                prom(dedup("numwatch_run_info"), instant=True),
                prom(dedup("numwatch_run_last_step"), instant=True),
                prom(f"time() - {dedup('numwatch_run_last_step_timestamp_seconds')}", instant=True),
            ],
            width=24,
            transformations=[
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True, "job": True, "__name__": True, "Value #A": True},
                        "renameByName": {"Value #B": "last step", "Value #C": "seconds since last step"},
                    },
                },
            ],
            fieldConfig={"defaults": {"links": run_link}, "overrides": []},
        ),
        timeseries("Loss", [prom(dedup("numwatch_loss"), by_run)]),
        timeseries("Global gradient norm", [prom(dedup("numwatch_global_grad_norm"), by_run)], log_base=10),
        timeseries("Loss scale", [prom(dedup("numwatch_loss_scale"), by_run)], log_base=2),
        panel(
            "table",
            "Alerts firing",
            [prom('ALERTS{alertstate="firing", alertname=~"Numwatch.*"}', instant=True)],
            transformations=[
                {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
            ],
        ),
        panel(
            "barchart",
            "Events by kind (time range)",
            [prom("sum by(kind) (max without(instance) (increase(numwatch_events_total[$__range])))", instant=True)],
            options={"xField": "kind", "showValue": "auto", "legend": {"showLegend": False}},
        ),
        timeseries(
            "Collector ingest",
            [
                prom("sum without(instance) (rate(numwatch_ingest_steps_total[$__rate_interval]))", "steps/s stored"),
                prom("sum without(instance) (rate(numwatch_ingest_requests_total[$__rate_interval]))", "batches/s"),
                prom(
                    "sum without(instance) (rate(numwatch_ingest_rejected_batches_total[$__rate_interval]))",
                    "rejected batches/s",
                ),
            ],
        ),
        timeseries(
            "Collector write latency p99",
            [
                prom(
                    "histogram_quantile(0.99, sum by(le) "
                    "(rate(numwatch_ingest_write_latency_seconds_bucket[$__rate_interval])))",
                    "p99",
                )
            ],
            unit="s",
        ),
        timeseries("Collector up", [prom('up{job="numwatch"}', "{{instance}}")]),
    ]
    return dashboard(OVERVIEW_DASHBOARD_UID, "numwatch overview", panels, [], [])


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "numwatch-overview.json": build_overview_dashboard,
    "numwatch-run.json": build_run_dashboard,
}


def render(build: Callable[[], dict[str, Any]]) -> str:
    """The file text of a dashboard (stable key order, trailing newline)."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def write_all(out_dir: Path = DASHBOARDS_DIR) -> list[Path]:
    """Write every dashboard JSON into ``out_dir``; returns the paths written."""
    paths = []
    for filename, build in DASHBOARDS.items():
        path = out_dir / filename
        path.write_text(render(build), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else DASHBOARDS_DIR):
        print(written)
