"""Grafana dashboards: generated files are current, queries parse in a real Prometheus
and use only contract metric names, format ranges agree with actual casts."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dashboards import generate
from tests.support.metrics_contract import PROMETHEUS_OWN, sample_exposition, unknown_metric_names
from tests.support.promstack import grafana_expr, instant_query, prometheus_for, serving_metrics, wait_for  # noqa: F401 (fixture)

SAMPLE_RUN = "dash-run"


def _dashboards() -> dict[str, dict]:
    return {name: json.loads((generate.DASHBOARDS_DIR / name).read_text()) for name in generate.DASHBOARDS}


def _prometheus_exprs() -> Iterator[tuple[str, str]]:
    """(where, expr) of every Prometheus query: panel targets, variables, annotations."""
    for name, model in _dashboards().items():
        for item in model["panels"]:
            for target in item["targets"]:
                if target["datasource"]["type"] == "prometheus":
                    yield f"{name}: {item['title']}", target["expr"]
        for annotation in model["annotations"]["list"]:
            if "expr" in annotation:
                yield f"{name}: annotation {annotation['name']}", annotation["expr"]


def _collector_urls(model: dict) -> list[str]:
    return [
        t["url"]
        for p in model["panels"]
        for t in p["targets"]
        if t["datasource"]["type"] == "yesoreyeram-infinity-datasource"
    ]


def test_committed_files_equal_generator_output(tmp_path: Path) -> None:
    for path in generate.write_all(tmp_path):
        committed = generate.DASHBOARDS_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{path.name} is stale: run python dashboards/generate.py"


def test_run_dashboard_identity_and_variables() -> None:
    model = _dashboards()["numwatch-run.json"]
    assert model["uid"] == "numwatch-run"
    variables = {variable["name"]: variable for variable in model["templating"]["list"]}
    assert variables["run"]["definition"] == "label_values(numwatch_run_info, run)"
    assert variables["rank"]["definition"].startswith("label_values(numwatch_run_last_step{")
    assert variables["rank"]["includeAll"] and variables["rank"]["allValue"] == ".*"


def test_run_dashboard_reads_per_layer_data_from_the_collector_api() -> None:
    model = _dashboards()["numwatch-run.json"]
    urls = _collector_urls(model)
    assert "/api/v1/runs/${run}/heatmap?stat=grad_norm" in urls
    assert "/api/v1/runs/${run}/events" in urls
    assert {
        "/api/v1/runs/${run}/histograms?tensor=${tensor}&kind=grad",
        "/api/v1/runs/${run}/histograms?tensor=${tensor}&kind=weight",
    } <= set(urls)
    heatmap = next(p for p in model["panels"] if p["type"] == "heatmap")
    assert [c["selector"] for c in heatmap["targets"][0]["columns"]] == ["step", "tensor", "value"]
    events = next(p for p in model["panels"] if p["title"] == "Events")
    assert {"time_ms", "step", "rank", "kind", "details"} == {c["selector"] for c in events["targets"][0]["columns"]}
    exprs = " ".join(expr for where, expr in _prometheus_exprs() if where.startswith("numwatch-run"))
    assert "histogram_quantile(0.99" in exprs and "numwatch_global_grad_norm_distribution_bucket" in exprs
    assert "topk(10" in exprs and "numwatch_layer_grad_norm" in exprs


def test_overview_shows_firing_alerts_and_events() -> None:
    exprs = [expr for where, expr in _prometheus_exprs() if where.startswith("numwatch-overview")]
    assert any(expr.startswith("ALERTS{") for expr in exprs)
    assert any("numwatch_events_total" in expr and "by(kind)" in expr for expr in exprs)


@pytest.mark.parametrize("name", list(generate.DASHBOARDS))
def test_panels_do_not_overlap(name: str) -> None:
    occupied: set[tuple[int, int]] = set()
    for item in _dashboards()[name]["panels"]:
        grid = item["gridPos"]
        assert grid["x"] + grid["w"] <= generate.GRID_WIDTH
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{item['title']} overlaps another panel"
        occupied |= cells


def test_queries_reference_only_contract_metrics() -> None:
    for where, expr in _prometheus_exprs():
        assert not unknown_metric_names(expr), f"{where}: {expr}"
        other = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\{", expr)) - PROMETHEUS_OWN
        assert all(name.startswith("numwatch_") for name in other), f"{where}: {expr}"


@pytest.mark.parametrize("name, dtype", list(generate.HISTOGRAM_FORMATS.items()))
def test_format_binades_agree_with_actual_casts(name: str, dtype: torch.dtype) -> None:
    """2^b for each boundary b, cast to the format: the boundaries are exactly where a cast
    stops flushing to zero, stops being subnormal, and starts overflowing."""
    fmt = generate.format_binades(name, dtype)
    smallest_normal = torch.finfo(dtype).smallest_normal

    def cast(exponent: int) -> float:
        return torch.tensor(2.0**exponent, dtype=torch.float64).to(dtype).double().item()

    assert cast(fmt.min_subnormal) == 2.0**fmt.min_subnormal
    assert cast(fmt.min_subnormal - 1) == 0.0
    assert cast(fmt.min_normal) >= smallest_normal > cast(fmt.min_normal - 1) > 0.0
    assert cast(fmt.max) == 2.0**fmt.max
    assert cast(fmt.max + 1) == float("inf")
    assert generate.region_expression(fmt).startswith(f"binade < {fmt.min_subnormal} ?")


@pytest.mark.binaries
@pytest.mark.slow
def test_every_query_parses_in_real_prometheus(prometheus_for) -> None:  # noqa: F811 (fixture)
    with serving_metrics(sample_exposition(SAMPLE_RUN, now=time.time())) as target:
        prometheus = prometheus_for(target)
        scraped = wait_for(lambda: instant_query(prometheus, "numwatch_run_info")["data"]["result"], 30.0)
        assert scraped, "Prometheus never scraped the sample exposition"
        for where, expr in _prometheus_exprs():
            answer = instant_query(prometheus, grafana_expr(expr, SAMPLE_RUN))
            assert answer["status"] == "success", f"{where}: {expr}: {answer.get('error')}"
        # Template variables: label_values(SELECTOR, LABEL) must find the label.
        for variable in _dashboards()["numwatch-run.json"]["templating"]["list"]:
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable.get("definition", ""))
            if match:
                answer = instant_query(prometheus, grafana_expr(match.group(1), SAMPLE_RUN))
                assert answer["status"] == "success" and answer["data"]["result"], variable["name"]
                assert all(match.group(2) in sample["metric"] for sample in answer["data"]["result"])
        # A gauge panel of the run dashboard finds the sample run's series.
        loss = instant_query(prometheus, grafana_expr(generate.run_metric("numwatch_loss"), SAMPLE_RUN))
        assert [sample["metric"]["run"] for sample in loss["data"]["result"]] == [SAMPLE_RUN]
