"""End to end: a watched training → real collector → real Prometheus → real Alertmanager.

All on loopback, started from deploy/'s configs (`numwatch.monitor.ops.stack`, the code behind
`numwatch stack`) with one-second intervals. The training is healthy for
``HEALTHY_STEPS`` optimizer steps, then one batch carries a NaN: the NaN alert must
reach Alertmanager (and the pager receiver its route sends it to) with the run's label,
no alert may have fired on the healthy steps (fp16 overflows the GradScaler absorbs at
its initial scale included), and every dashboard query must parse and find the run's data.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from torch import nn

import numwatch
from dashboards import generate
from numwatch.monitor.ops import stack
from tests.support.binaries import require_binary
from tests.support.promstack import alertmanager_alerts, get_json, grafana_expr, instant_query, wait_for

pytestmark = [pytest.mark.binaries, pytest.mark.slow]

RUN = "e2e-nan-run"
HEALTHY_STEPS = 30
AFTER_NAN_STEPS = 5
ALERT_TIMEOUT_S = 60.0
# Panels that are empty in a run like this one, by design: the model is an MLP regression
# (no attention call, one output), so the forward-pass panels have nothing to show;
# tests/test_e2e_attention.py checks them on a transformer run.
FORWARD_PANELS: frozenset[str] = frozenset(
    {
        "Max attention logit (sampled forwards)",
        "Output logits: log Z = logsumexp over the vocabulary (sampled forwards)",
    }
)
# A demo-like run is one process: the per-rank panels show data only for multi-rank runs
# (their data are checked in tests/e2e's rank tests and tests/collector/test_exposition.py).
RANK_PANELS: frozenset[str] = frozenset(
    {
        "Ranks: each rank's own gradient norm before the all-reduce (multi-rank runs)",
        "Ranks: compute time before the reduction; stragglers and diverged replicas",
    }
)
EXPECTED_EMPTY: frozenset[str] = FORWARD_PANELS | RANK_PANELS


@dataclass
class Stack:
    collector: str
    prometheus: str
    alertmanager: str
    webhook_posts: list[dict]
    alerts_before_nan: list[dict]


class Webhook:
    """A loopback HTTP receiver recording Alertmanager's webhook posts."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                posts.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, inputs: torch.Tensor
) -> None:
    targets = torch.ones(inputs.shape[0], 1)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(inputs).float(), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def _firing(prometheus: str, alertname: str) -> list[dict]:
    answer = instant_query(prometheus, f'ALERTS{{alertname="{alertname}", alertstate="firing", run="{RUN}"}}')
    return answer["data"]["result"]


@pytest.fixture(scope="module")
def trained_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_binary = require_binary("prometheus")
    alertmanager_binary = require_binary("prometheus-alertmanager")
    workdir = tmp_path_factory.mktemp("e2e")
    with ExitStack() as resources:
        webhook = Webhook()
        resources.callback(webhook.close)
        collector = resources.enter_context(stack.running_collector(workdir))
        alertmanager = resources.enter_context(
            stack.running_alertmanager(alertmanager_binary, workdir, stack.alertmanager_config(webhook.url))
        )
        config = stack.prometheus_config(
            urllib.parse.urlsplit(collector).netloc, urllib.parse.urlsplit(alertmanager).netloc, interval="1s"
        )
        prometheus = resources.enter_context(stack.running_prometheus(prometheus_binary, workdir, config))

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu")
        watcher = numwatch.watch(
            model, optimizer, scaler=scaler, run=RUN, url=collector, histogram_every=5, format_every=1, quant_every=10
        )
        resources.callback(watcher.close)
        for _ in range(HEALTHY_STEPS):
            _train_step(model, optimizer, scaler, torch.randn(8, 16))
        watcher.flush()
        # Prometheus has seen every healthy step before the NaN comes.
        seen = wait_for(
            lambda: instant_query(prometheus, f'numwatch_steps_total{{run="{RUN}"}} >= {HEALTHY_STEPS}')["data"][
                "result"
            ],
            ALERT_TIMEOUT_S,
        )
        assert seen, "Prometheus never scraped the healthy steps from the collector"
        # Two more evaluations so any rule the healthy steps would trigger has fired.
        wait_for(lambda: False, 2.5)
        alerts_before_nan = instant_query(prometheus, f'ALERTS{{run="{RUN}"}}')["data"]["result"]

        poisoned = torch.randn(8, 16)
        poisoned[3, 5] = float("nan")
        _train_step(model, optimizer, scaler, poisoned)
        for _ in range(AFTER_NAN_STEPS):
            _train_step(model, optimizer, scaler, torch.randn(8, 16))
        watcher.flush()
        yield Stack(collector, prometheus, alertmanager, webhook.posts, alerts_before_nan)


def test_no_alert_fires_on_healthy_steps(trained_stack: Stack) -> None:
    assert trained_stack.alerts_before_nan == []


def test_nan_alert_reaches_alertmanager_with_the_run_label(trained_stack: Stack) -> None:
    def nan_alerts() -> list[dict]:
        return [
            alert
            for alert in alertmanager_alerts(trained_stack.alertmanager)
            if alert["labels"].get("alertname") == "NumwatchNonFiniteLoss" and alert["labels"].get("run") == RUN
        ]

    alerts = wait_for(nan_alerts, ALERT_TIMEOUT_S)
    assert alerts, f"no NumwatchNonFiniteLoss alert for {RUN} in Alertmanager within {ALERT_TIMEOUT_S}s"
    assert alerts[0]["labels"]["severity"] == "critical"
    assert f"var-run={RUN}" in alerts[0]["annotations"]["dashboard"]
    # The critical route of deploy/alertmanager/alertmanager.yml pages (group_wait 10s).
    paged = wait_for(
        lambda: [
            p for p in trained_stack.webhook_posts if p["receiver"] == "pager" and p["commonLabels"].get("run") == RUN
        ],
        ALERT_TIMEOUT_S,
    )
    assert paged, "the pager receiver never got the NaN alert"
    # The scaler skipped that step: no explosion, the NaN step is not counted as one.
    assert _firing(trained_stack.prometheus, "NumwatchGradientExplosion") == []
    events = get_json(f"{trained_stack.collector}/api/v1/runs/{RUN}/events")
    kinds = {event["kind"] for event in events}
    assert "nonfinite_grad" in kinds and "grad_explosion" not in kinds
    nonfinite_loss_steps = [event["step"] for event in events if event["kind"] == "nonfinite_loss"]
    assert nonfinite_loss_steps == [HEALTHY_STEPS + 1]


def _panels() -> Iterator[tuple[str, dict]]:
    for name in generate.DASHBOARDS:
        model = json.loads((generate.DASHBOARDS_DIR / name).read_text())
        for panel in model["panels"]:
            yield name, panel


def test_every_dashboard_panel_finds_the_run(trained_stack: Stack) -> None:
    # NaN alert fired by now (the previous test waited for it), so the alert panels have data too.
    wait_for(lambda: _firing(trained_stack.prometheus, "NumwatchNonFiniteLoss"), ALERT_TIMEOUT_S)
    empty = []
    for name, panel in _panels():
        for target in panel.get("targets", []):
            source = target["datasource"]["type"]
            if source == "prometheus":
                answer = instant_query(trained_stack.prometheus, grafana_expr(target["expr"], RUN))
                assert answer["status"] == "success", f"{name}: {panel['title']}: {answer.get('error')}"
                has_data = bool(answer["data"]["result"])
            elif source == "yesoreyeram-infinity-datasource":
                path = grafana_expr(target["url"].replace("${tensor}", "0.weight"), RUN)
                has_data = bool(get_json(f"{trained_stack.collector}{path}"))
            else:
                continue
            if not has_data and panel["title"] not in EXPECTED_EMPTY:
                empty.append(f"{name}: {panel['title']}: {target.get('expr') or target.get('url')}")
    assert empty == [], "panels without data after a demo-like run:\n" + "\n".join(empty)
