"""The alerting stack from installed binaries, for a local try-out without Docker.

``numwatch stack`` (``make stack``) starts a collector, Prometheus and Alertmanager on
loopback ports with the configuration in ``deploy/`` — the same rules, routes and scrape
job docker-compose uses, with only addresses (and, for tests, intervals) rewritten.
The integration tests start their servers through the same functions, so what the tests
prove is what a user runs.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, TextIO

import yaml

# deploy/ ships as the package data of numwatch.deploy: the same files in a checkout and a wheel.
DEPLOY_DIR = Path(str(files("numwatch.deploy")))
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")  # Debian's name first
INSTALL_HINT = "install them with `apt-get install prometheus prometheus-alertmanager` (Debian/Ubuntu)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``predicate`` until it returns something truthy; its last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def answers_ok(url: str) -> bool:
    """Whether GET ``url`` answers 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve_until_interrupted(message: str, out: TextIO) -> None:
    """Write ``message`` (how to stop), then block until Ctrl-C (SIGINT) or SIGTERM.

    Both are handled explicitly: a process started from a non-interactive shell's
    background job inherits SIGINT as ignored, and Python then never raises
    KeyboardInterrupt, so "until Ctrl-C" would mean forever. The previous handlers are
    restored on return. They are installed before the message goes out, so a signal sent
    as soon as it is read is not lost.
    """
    interrupted = threading.Event()

    def handler(signum: int, frame: object) -> None:
        interrupted.set()

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        out.write(message)
        out.flush()
        # A timed wait: the main thread returns to the interpreter, which runs the handler.
        while not interrupted.wait(0.5):
            pass
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def find_binary(*names: str) -> str | None:
    """The first of ``names`` found on PATH."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def managed_process(argv: list[str], ready_url: str, log_path: Path) -> Iterator[subprocess.Popen]:
    """Run ``argv`` (output to ``log_path``) until the context exits; enters once ``ready_url`` answers 200.

    The process is always stopped on exit (terminate, then kill), also when the body raises.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = wait_for(lambda: process.poll() is not None or answers_ok(ready_url), READY_TIMEOUT_S)
            if process.poll() is not None or not ready:
                raise RuntimeError(
                    f"{Path(argv[0]).name} did not become ready at {ready_url}:\n{log_path.read_text()[-3000:]}"
                )
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)


def load_deploy_yaml(relative: str, deploy_dir: Path = DEPLOY_DIR) -> dict:
    """A YAML file of ``deploy/``."""
    path = deploy_dir / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the numwatch installation is incomplete; reinstall it (pip install --force-reinstall "
            "numwatch)"
        )
    return yaml.safe_load(path.read_text())


def prometheus_config(
    collector: str,
    alertmanager: str | None,
    *,
    interval: str | None = None,
    grafana_url: str | None = None,
    self_address: str | None = None,
    rule_files: tuple[Path, ...] | None = None,
    deploy_dir: Path = DEPLOY_DIR,
) -> dict:
    """``deploy/prometheus/prometheus.yml`` with its addresses rewritten for loopback.

    ``collector`` and ``alertmanager`` are host:port; ``interval`` replaces the scrape and
    evaluation intervals (tests use 1s); rule files become absolute paths.
    """
    config = copy.deepcopy(load_deploy_yaml("prometheus/prometheus.yml", deploy_dir))
    if interval:
        config["global"]["scrape_interval"] = interval
        config["global"]["evaluation_interval"] = interval
    if grafana_url:
        config["global"].setdefault("external_labels", {})["grafana_url"] = grafana_url
    rules = rule_files or tuple(deploy_dir / "prometheus" / name for name in config.get("rule_files", []))
    config["rule_files"] = [str(path) for path in rules]
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    else:
        config.pop("alerting", None)
    scrape_configs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "numwatch":
            job["static_configs"] = [{"targets": [collector]}]
        elif job["job_name"] == "prometheus":
            if not self_address:
                continue
            job["static_configs"] = [{"targets": [self_address]}]
        scrape_configs.append(job)
    config["scrape_configs"] = scrape_configs
    return config


def alertmanager_config(webhook_url: str | None = None, deploy_dir: Path = DEPLOY_DIR) -> dict:
    """``deploy/alertmanager/alertmanager.yml`` with every receiver pointed at ``webhook_url``.

    Without a URL the receivers keep their routes but send nothing (the example bridges in
    the file do not exist on a laptop); alerts are still visible in Alertmanager's UI and API.
    """
    config = copy.deepcopy(load_deploy_yaml("alertmanager/alertmanager.yml", deploy_dir))
    for receiver in config.get("receivers", []):
        receiver.pop("webhook_configs", None)
        if webhook_url:
            receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": True}]
    return config


@contextmanager
def _running_server(
    name: str, argv: list[str], workdir: Path, config: dict, port: int | None, data_flag: str
) -> Iterator[str]:
    """``argv`` + config/data/listen flags for a Prometheus-family server in ``workdir/name``; yields its URL."""
    root = workdir / name
    (root / "data").mkdir(parents=True, exist_ok=True)
    config_path = root / f"{name}.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [f"--config.file={config_path}", f"{data_flag}={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    with managed_process([*argv[:1], *flags, *argv[1:]], f"{url}/-/ready", root / f"{name}.log"):
        yield url


@contextmanager
def running_alertmanager(binary: str, workdir: Path, config: dict, port: int | None = None) -> Iterator[str]:
    """A real Alertmanager (clustering off) with ``config``; yields its URL."""
    with _running_server(
        "alertmanager", [binary, "--cluster.listen-address="], workdir, config, port, "--storage.path"
    ) as url:
        yield url


@contextmanager
def running_prometheus(binary: str, workdir: Path, config: dict, port: int | None = None) -> Iterator[str]:
    """A real Prometheus with ``config``; yields its URL."""
    with _running_server("prometheus", [binary], workdir, config, port, "--storage.tsdb.path") as url:
        yield url


@contextmanager
def running_collector(
    workdir: Path, database_url: str | None = None, port: int | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[str]:
    """``numwatch serve`` in a subprocess on loopback (auth off); yields its URL."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    database_url = database_url or f"sqlite:///{workdir / 'numwatch.db'}"
    with managed_process(collector_argv(port, database_url, extra_args), f"{url}/readyz", workdir / "collector.log"):
        yield url


def collector_argv(port: int, database_url: str, extra_args: tuple[str, ...] = ()) -> list[str]:
    """The command line of ``numwatch serve`` on 127.0.0.1:``port`` (this Python's monitor package)."""
    return [
        sys.executable,
        "-m",
        "numwatch.monitor.ops.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database-url",
        database_url,
        *extra_args,
    ]


def run_stack(args: argparse.Namespace) -> int:
    """``numwatch stack``: start the three servers, print where they are, run until Ctrl-C."""
    prometheus = find_binary("prometheus")
    alertmanager = find_binary(*ALERTMANAGER_BINARIES)
    if not prometheus or not alertmanager:
        missing = [name for name, path in (("prometheus", prometheus), ("alertmanager", alertmanager)) if not path]
        print(f"numwatch stack: {', '.join(missing)} not found on PATH; {INSTALL_HINT}.", file=sys.stderr)
        return 2
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        collector_url = args.url or stack.enter_context(
            running_collector(workdir, args.database_url, args.collector_port)
        )
        am_url = stack.enter_context(
            running_alertmanager(alertmanager, workdir, alertmanager_config(args.webhook_url), args.alertmanager_port)
        )
        prom_port = args.prometheus_port or free_port()
        config = prometheus_config(
            collector_url.split("://", 1)[-1].rstrip("/"),
            am_url.split("://", 1)[-1],
            interval=args.interval,
            self_address=f"127.0.0.1:{prom_port}",
        )
        prom_url = stack.enter_context(running_prometheus(prometheus, workdir, config, prom_port))
        print(f"collector     {collector_url}   (export NUMWATCH_URL={collector_url})")
        print(f"prometheus    {prom_url}   (alerts: {prom_url}/alerts)")
        print(f"alertmanager  {am_url}")
        serve_until_interrupted(f"logs and data under {workdir}; Ctrl-C stops everything.\n", sys.stdout)
        print("stopping…")
    return 0


def add_stack_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``numwatch stack`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "stack",
        help="run collector, Prometheus and Alertmanager locally from installed binaries (no Docker)",
        description=(
            "Start a collector, Prometheus and Alertmanager on 127.0.0.1 with the configuration in deploy/ "
            "(alert rules, routes, scrape job), for a local try-out without Docker. Needs the prometheus and "
            f"alertmanager binaries: {INSTALL_HINT}. Grafana is not started: point one at Prometheus, or use "
            "deploy/docker-compose.yml."
        ),
    )
    parser.add_argument(
        "--workdir",
        default="numwatch-stack",
        help="directory for the servers' data, configs and logs (default: ./numwatch-stack)",
    )
    parser.add_argument("--url", help="use this running collector instead of starting one")
    parser.add_argument("--database-url", help="database of the started collector (default: SQLite in --workdir)")
    parser.add_argument("--collector-port", type=int, default=8428, help="collector port (default 8428)")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus port (default 9090)")
    parser.add_argument("--alertmanager-port", type=int, default=9093, help="Alertmanager port (default 9093)")
    parser.add_argument("--interval", default="5s", help="scrape and rule-evaluation interval (default 5s)")
    parser.add_argument(
        "--webhook-url", help="send every alert to this webhook (default: alerts only visible in Alertmanager)"
    )
    parser.set_defaults(func=run_stack)
    return parser
