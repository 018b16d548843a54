"""Real Prometheus and Alertmanager on loopback ports, for integration tests.

Each server gets its own config and storage in a temporary directory, listens on a
free 127.0.0.1 port, is waited for until ``/-/ready`` answers, and is always stopped
(terminate, then kill) when its context exits. Prometheus scrapes one given target
every second and evaluates the repository's real alert rules every second.

    with running_alertmanager(tmp) as am, running_prometheus(tmp, "127.0.0.1:8428", alertmanager=am) as prom:
        ...

The fixtures ``alertmanager`` and ``prometheus_for`` wrap these for pytest.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from numwatch.monitor.ops import stack
from numwatch.monitor.ops.stack import free_port, wait_for  # noqa: F401 (re-exported for the tests)
from tests.support.binaries import require_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = (REPO_ROOT / "deploy" / "prometheus" / "rules" / "numwatch.rules.yml",)
STOP_TIMEOUT_S = 10.0
GRAFANA_URL = "http://127.0.0.1:3000"


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


SILENT_ALERTMANAGER = {"route": {"receiver": "null", "group_by": ["run", "alertname"]}, "receivers": [{"name": "null"}]}


@contextmanager
def running_alertmanager(workdir: Path, config: dict | None = None) -> Iterator[str]:
    """A real Alertmanager (clustering off) with ``config`` (default: one silent receiver); yields its URL."""
    with stack.running_alertmanager(
        require_binary("prometheus-alertmanager"), workdir, config or SILENT_ALERTMANAGER
    ) as url:
        yield url


@contextmanager
def running_prometheus(
    workdir: Path,
    target: str,
    alertmanager: str | None = None,
    rule_files: tuple[Path, ...] = RULE_FILES,
) -> Iterator[str]:
    """A real Prometheus from deploy/'s config scraping ``target`` every second; yields its URL."""
    alertmanager_address = urllib.parse.urlsplit(alertmanager).netloc if alertmanager else None
    config = stack.prometheus_config(
        target, alertmanager_address, interval="1s", grafana_url=GRAFANA_URL, rule_files=rule_files
    )
    with stack.running_prometheus(require_binary("prometheus"), workdir, config) as url:
        yield url


def collector_and_prometheus(resources: ExitStack, workdir: Path) -> tuple[str, str]:
    """A real collector and a real Prometheus scraping it (and evaluating the rules) every second,
    kept until ``resources`` close; their URLs."""
    collector = resources.enter_context(stack.running_collector(workdir))
    config = stack.prometheus_config(urllib.parse.urlsplit(collector).netloc, None, interval="1s")
    return collector, resources.enter_context(stack.running_prometheus(require_binary("prometheus"), workdir, config))


def wait_for_scraped_step(prometheus: str, run: str, step: int, timeout: float) -> None:
    """Until Prometheus holds a scrape of ``run`` at ``step`` or later (an alert may already fire
    from an earlier scrape, so a firing alert does not say the last values are in)."""
    seen = wait_for(
        lambda: instant_query(prometheus, f'numwatch_run_last_step{{run="{run}"}} >= {step}')["data"]["result"], timeout
    )
    assert seen, f"Prometheus never scraped step {step} of {run}"


def instant_query(prometheus: str, promql: str) -> dict:
    """The decoded answer of ``/api/v1/query`` (status "error" included, not raised)."""
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        return get_json(url)
    except urllib.error.HTTPError as error:  # 400/422 carry the parse error as JSON
        return json.load(error)


def alertmanager_alerts(alertmanager: str) -> list[dict]:
    """Alerts the Alertmanager currently holds (``/api/v2/alerts``)."""
    return get_json(f"{alertmanager}/api/v2/alerts")


@contextmanager
def serving_metrics(text: str) -> Iterator[str]:
    """A local HTTP server answering ``/metrics`` with ``text``; yields its host:port."""
    body = text.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path != "/metrics":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """URL of a real Alertmanager for this test."""
    with running_alertmanager(tmp_path) as url:
        yield url


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: ``prometheus_for(target, alertmanager=None)`` starts a real Prometheus and returns its URL."""
    with ExitStack() as stack:

        def start(target: str, alertmanager: str | None = None) -> str:
            workdir = tmp_path / f"prometheus-{free_port()}"
            return stack.enter_context(running_prometheus(workdir, target, alertmanager))

        yield start


def grafana_expr(expr: str, run: str) -> str:
    """A dashboard query with the values Grafana would put in for its variables, for ``run``."""
    values = {"$__rate_interval": "1m", "$__range": "1h", "$run": run, "${run}": run, "$rank": ".*"}
    for variable, value in sorted(values.items(), key=lambda item: -len(item[0])):  # ${run} before $run
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr
