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
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.binaries import require_binary

REPO_ROOT = Path(__file__).resolve().parent.parent
RULE_FILES = (REPO_ROOT / "deploy" / "prometheus" / "rules" / "numwatch.rules.yml",)
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
GRAFANA_URL = "http://127.0.0.1:3000"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _server(argv: list[str], url: str, log_path: Path) -> Iterator[str]:
    """Run ``argv`` until the context exits; yields ``url`` once it reports ready."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = wait_for(lambda: process.poll() is not None or _is_ready(url), READY_TIMEOUT_S)
            if process.poll() is not None or not ready:
                raise RuntimeError(f"{argv[0]} did not become ready at {url}:\n{log_path.read_text()[-3000:]}")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_alertmanager(workdir: Path, config: dict | None = None) -> Iterator[str]:
    """A real Alertmanager (clustering off) with ``config`` (default: one silent receiver); yields its URL."""
    binary = require_binary("prometheus-alertmanager")
    root = workdir / "alertmanager"
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = config or {"route": {"receiver": "null", "group_by": ["run", "alertname"]}, "receivers": [{"name": "null"}]}
    config_path = root / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with _server(argv, f"http://127.0.0.1:{port}", root / "alertmanager.log") as url:
        yield url


def prometheus_config(target: str, alertmanager: str | None, rule_files: tuple[Path, ...]) -> dict:
    """Prometheus config scraping ``target`` (host:port) as job numwatch every second."""
    config: dict = {
        "global": {
            "scrape_interval": "1s",
            "evaluation_interval": "1s",
            "external_labels": {"grafana_url": GRAFANA_URL},
        },
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "numwatch", "static_configs": [{"targets": [target]}]}],
    }
    if alertmanager:
        host = urllib.parse.urlsplit(alertmanager).netloc
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
    return config


@contextmanager
def running_prometheus(
    workdir: Path,
    target: str,
    alertmanager: str | None = None,
    rule_files: tuple[Path, ...] = RULE_FILES,
) -> Iterator[str]:
    """A real Prometheus scraping ``target`` with the repository's rules; yields its URL."""
    binary = require_binary("prometheus")
    root = workdir / "prometheus"
    (root / "data").mkdir(parents=True, exist_ok=True)
    config_path = root / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(target, alertmanager, rule_files)))
    port = free_port()
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with _server(argv, f"http://127.0.0.1:{port}", root / "prometheus.log") as url:
        yield url


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
