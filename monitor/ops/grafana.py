"""Grafana integration: push numwatch's datasources and dashboards, post events as annotations.

The design card names ``grafana-api``; that package is unmaintained ("not supported
anymore", last release 2020). ``grafana-client`` is its maintained fork with the same
API (``GrafanaApi.from_url``, ``dashboard.update_dashboard``,
``annotations.add_annotation``), and is what this module uses. It is imported lazily:
the collector runs without Grafana, and importing this module costs nothing.

CLI: :func:`add_grafana_cli` adds ``numwatch grafana push --url --token ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from numwatch import settings as client_settings
from numwatch.monitor.settings import Settings

logger = logging.getLogger(__name__)

# Datasource uids the dashboards reference (dashboards/generate.py and the file
# provisioning under deploy/grafana use the same ones).
PROMETHEUS_DATASOURCE = {"name": "numwatch Prometheus", "uid": "numwatch-prometheus", "type": "prometheus"}
COLLECTOR_DATASOURCE = {
    "name": "numwatch collector",
    "uid": "numwatch-collector",
    "type": "yesoreyeram-infinity-datasource",
}
DEFAULT_DASHBOARDS_DIR = Path(str(files("numwatch.dashboards")))
DEFAULT_GRAFANA_URL = "http://localhost:3000"
HTTP_NOT_FOUND = 404


def _grafana_api(url: str, token: str | None, timeout: float) -> Any:
    """A ``grafana_client.GrafanaApi`` for ``url``, authenticated with a bearer ``token``."""
    from grafana_client import GrafanaApi  # lazy: only Grafana users need grafana-client

    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def datasource_models(
    prometheus_url: str, collector_url: str, collector_token: str | None = None
) -> list[dict[str, Any]]:
    """The two datasources the dashboards use, as ``POST /api/datasources`` bodies."""
    prometheus = {
        **PROMETHEUS_DATASOURCE,
        "url": prometheus_url,
        "access": "proxy",
        "isDefault": True,
        "jsonData": {"httpMethod": "POST"},
    }
    # Infinity prefixes the datasource URL to each panel's relative /api/v1/... path and
    # only calls allowed hosts.
    collector: dict[str, Any] = {
        **COLLECTOR_DATASOURCE,
        "url": collector_url,
        "access": "proxy",
        "isDefault": False,
        "jsonData": {"allowedHosts": [collector_url]},
    }
    if collector_token:
        collector["jsonData"]["auth_method"] = "bearerToken"
        collector["secureJsonData"] = {"bearerToken": collector_token}
    return [prometheus, collector]


@dataclass
class PushSummary:
    """What :func:`push_dashboards` changed in Grafana."""

    datasources_created: list[str] = field(default_factory=list)
    datasources_updated: list[str] = field(default_factory=list)
    dashboards: list[str] = field(default_factory=list)  # uids written


def _upsert_datasource(api: Any, model: dict[str, Any], summary: PushSummary) -> None:
    from grafana_client.client import GrafanaClientError

    try:
        existing = api.datasource.get_datasource_by_name(model["name"])
    except GrafanaClientError as error:
        if error.status_code != HTTP_NOT_FOUND:
            raise
        api.datasource.create_datasource(model)
        summary.datasources_created.append(model["name"])
        return
    api.datasource.update_datasource(existing["id"], {**model, "uid": existing.get("uid", model["uid"])})
    summary.datasources_updated.append(model["name"])


class DashboardFileError(ValueError):
    """A dashboard file that cannot be pushed: missing, not JSON, or not a dashboard model."""


REQUIRED_DASHBOARD_KEYS = {"uid": str, "title": str, "panels": list}


def load_dashboards(dashboards_dir: Path) -> list[dict[str, Any]]:
    """Every dashboard model (``*.json``) in ``dashboards_dir``, sorted by file name, each checked
    to be a dashboard Grafana accepts (an object with a string uid and title and a panel list).

    Raises :class:`DashboardFileError` naming the file, so a push can refuse before its first request.
    """
    paths = sorted(Path(dashboards_dir).glob("*.json"))
    if not paths:
        raise DashboardFileError(f"no dashboard JSON files in {dashboards_dir}")
    models = []
    for path in paths:
        try:
            model = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DashboardFileError(f"{path}: not a readable JSON file ({error})") from None
        if not isinstance(model, dict):
            raise DashboardFileError(f"{path}: a dashboard must be a JSON object, got {type(model).__name__}")
        for key, kind in REQUIRED_DASHBOARD_KEYS.items():
            if not isinstance(model.get(key), kind):
                raise DashboardFileError(f"{path}: field {key!r} must be a {kind.__name__}")
        models.append(model)
    return models


def push_dashboards(
    url: str,
    token: str | None,
    dashboards_dir: Path | str,
    prometheus_url: str,
    collector_url: str,
    *,
    folder_uid: str | None = None,
    collector_token: str | None = None,
    timeout: float = 10.0,
) -> PushSummary:
    """Create or update the numwatch datasources and dashboards in the Grafana at ``url``.

    Every dashboard file is read and checked first, so a bad or missing file fails the push
    before anything is sent (never a half-applied push). Datasources are looked up by name
    and updated in place (keeping their uid), else created with the uids the dashboards
    reference. Dashboards are written with ``overwrite`` so a push is idempotent.
    """
    dashboards = load_dashboards(Path(dashboards_dir))
    api = _grafana_api(url, token, timeout)
    summary = PushSummary()
    for model in datasource_models(prometheus_url, collector_url, collector_token):
        _upsert_datasource(api, model, summary)
    for model in dashboards:
        # Grafana matches by uid; a numeric id from another instance would clash.
        payload: dict[str, Any] = {
            "dashboard": {**model, "id": None},
            "overwrite": True,
            "message": "numwatch grafana push",
        }
        if folder_uid:
            payload["folderUid"] = folder_uid
        api.dashboard.update_dashboard(payload)
        summary.dashboards.append(model["uid"])
    return summary


def annotation_for(event: dict[str, Any], run: str) -> dict[str, Any]:
    """``add_annotation`` arguments for a collector event ({"step","rank","kind","details","time"[, "time_ms"]})."""
    time_ms = event.get("time_ms")
    if time_ms is None:
        time_ms = round(float(event["time"]) * 1000)
    details = event.get("details") or {}
    text = f"{event['kind']} at step {event['step']} (rank {event.get('rank', 0)})"
    if details:
        text += f": {json.dumps(details, sort_keys=True, default=str)}"
    return {"time_from": int(time_ms), "time_to": int(time_ms), "tags": ["numwatch", event["kind"], run], "text": text}


class AnnotationSink:
    """Posts events to Grafana as annotations from a background thread.

    :meth:`post` never blocks: it puts the event on a bounded queue and returns False
    (counted in ``dropped``) when the queue is full. Failed posts are counted in
    ``failed`` and not retried, so a down Grafana costs the collector nothing.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        max_queue: int = 1000,
        timeout: float = 5.0,
        dashboard_uid: str | None = None,
    ) -> None:
        self._url = url
        self._token = token
        self._timeout = timeout
        self._dashboard_uid = dashboard_uid
        self._queue: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        # Each counter has one writer: the worker (posted, failed) or the caller (dropped).
        self.posted = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._work, name="numwatch-annotations", daemon=True)
        self._thread.start()

    def post(self, event: dict[str, Any], run: str) -> bool:
        """Queue ``event`` of ``run`` for posting; False when it was dropped (queue full or closed)."""
        if self._stop.is_set():
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait((event, run))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Post what is queued (within ``timeout`` seconds), then stop the worker."""
        self._stop.set()
        self._thread.join(timeout)

    def _work(self) -> None:
        api = None
        while True:
            try:
                event, run = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                api = api or _grafana_api(self._url, self._token, self._timeout)
                api.annotations.add_annotation(dashboard_uid=self._dashboard_uid, **annotation_for(event, run))
                self.posted += 1
            except Exception as error:  # any failure (network, 4xx, 5xx) only counts
                self.failed += 1
                logger.debug("annotation post to %s failed: %s", self._url, error)


def _push_command(args: argparse.Namespace) -> int:
    # The same Grafana the collector posts annotations to, from the same settings.
    settings = Settings()
    try:
        summary = push_dashboards(
            args.url or settings.grafana_url or DEFAULT_GRAFANA_URL,
            args.token or settings.grafana_token,
            args.dashboards_dir,
            args.prometheus_url,
            args.collector_url,
            folder_uid=args.folder_uid,
            collector_token=args.collector_token,
        )
    except DashboardFileError as error:
        print(f"numwatch grafana push: nothing was sent: {error}", file=sys.stderr)
        return 2
    print(f"datasources created: {', '.join(summary.datasources_created) or '-'}")
    print(f"datasources updated: {', '.join(summary.datasources_updated) or '-'}")
    print(f"dashboards written: {', '.join(summary.dashboards)}")
    return 0


def add_grafana_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``grafana push`` to an argparse subparsers object; the leaf parser's
    ``func(args) -> int`` default runs the push."""
    grafana = subparsers.add_parser("grafana", help="Grafana dashboards and datasources")
    commands = grafana.add_subparsers(dest="grafana_command", required=True)
    push = commands.add_parser("push", help="create or update numwatch's datasources and dashboards in Grafana")
    # Defaults are read when the push runs: building the parser must not depend on valid server settings.
    push.add_argument(
        "--url", default=None, help=f"Grafana base URL (env NUMWATCH_GRAFANA_URL, else {DEFAULT_GRAFANA_URL})"
    )
    push.add_argument("--token", default=None, help="Grafana service-account token (env NUMWATCH_GRAFANA_TOKEN)")
    push.add_argument(
        "--dashboards-dir", type=Path, default=DEFAULT_DASHBOARDS_DIR, help="directory of dashboard JSON files"
    )
    push.add_argument("--prometheus-url", default="http://prometheus:9090", help="Prometheus URL as Grafana reaches it")
    push.add_argument(
        "--collector-url", default="http://collector:8428", help="numwatch collector URL as Grafana reaches it"
    )
    push.add_argument(
        "--collector-token",
        default=client_settings.read(client_settings.TOKEN),
        help=f"read token for the collector API (env {client_settings.TOKEN})",
    )
    push.add_argument("--folder-uid", default=None, help="Grafana folder uid for the dashboards")
    push.set_defaults(func=_push_command)
    return push
