"""Grafana provisioning: push numwatch's datasources and dashboards.

Grafana is reached through ``grafana-client`` (see :mod:`numwatch.monitor.metrics.annotations`,
which also posts the collector's events as annotations), imported lazily: importing this module costs nothing.

CLI: :func:`add_grafana_cli` adds ``numwatch grafana push --url --token ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from numwatch import settings as client_settings
from numwatch.monitor.metrics.annotations import grafana_api
from numwatch.monitor.settings import Settings

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
    api = grafana_api(url, token, timeout)
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
