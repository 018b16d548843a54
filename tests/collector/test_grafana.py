"""numwatch.monitor.ops.grafana against a real local HTTP server that checks each request the way
Grafana's documented HTTP API accepts it (grafana-client uses niquests, which
responses/requests_mock cannot intercept)."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from numwatch.monitor.metrics.annotations import AnnotationSink
from numwatch.monitor.ops import grafana
from tests.support.promstack import free_port

TOKEN = "glsa_test_token"
REPO_DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"


@dataclass
class FakeGrafana:
    """State and request log of the fake Grafana."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)  # by name
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # by uid
    annotations: list[dict[str, Any]] = field(default_factory=list)
    annotation_status: int = 200
    first_annotation_seen: threading.Event = field(default_factory=threading.Event)
    release_annotations: threading.Event = field(default_factory=threading.Event)

    def paths(self, method: str) -> list[str]:
        return [r["path"] for r in self.requests if r["method"] == method]


def _check_datasource_body(body: dict[str, Any]) -> str | None:
    for key, kind in (("name", str), ("type", str), ("url", str), ("access", str)):
        if not isinstance(body.get(key), kind):
            return f"datasource field {key!r} missing or not {kind.__name__}"
    if body["access"] not in {"proxy", "direct"}:
        return "access must be proxy or direct"
    return None


def _check_dashboard_body(body: dict[str, Any]) -> str | None:
    dashboard = body.get("dashboard")
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("uid"), str) or not dashboard.get("title"):
        return "dashboard object with uid and title required"
    if dashboard.get("id") is not None:
        return "id must be null when importing by uid"
    if not isinstance(body.get("overwrite"), bool):
        return "overwrite must be a boolean"
    if "folderUid" in body and not isinstance(body["folderUid"], str):
        return "folderUid must be a string"
    return None


def _check_annotation_body(body: dict[str, Any]) -> str | None:
    for key in ("time", "timeEnd"):
        if not isinstance(body.get(key), int) or body[key] < 10**12:
            return f"{key} must be epoch milliseconds"
    if not (isinstance(body.get("tags"), list) and all(isinstance(tag, str) for tag in body["tags"])):
        return "tags must be a list of strings"
    if not isinstance(body.get("text"), str) or not body["text"]:
        return "text required"
    return None


def _handler(state: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            entry = {
                "method": self.command,
                "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "content_type": self.headers.get("Content-Type"),
                "json": json.loads(raw) if raw else None,
            }
            state.requests.append(entry)
            return entry

        def do_GET(self) -> None:  # noqa: N802
            self._record()
            prefix = "/api/datasources/name/"
            if self.path.startswith(prefix):
                name = self.path[len(prefix) :].replace("%20", " ")
                if name in state.datasources:
                    return self._reply(200, state.datasources[name])
                return self._reply(404, {"message": "Data source not found"})
            self._reply(404, {"message": "Not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = self._record()["json"] or {}
            if self.path == "/api/datasources":
                if error := _check_datasource_body(body):
                    return self._reply(400, {"message": error})
                stored = {**body, "id": len(state.datasources) + 1}
                state.datasources[body["name"]] = stored
                return self._reply(
                    200, {"datasource": stored, "id": stored["id"], "message": "Datasource added", "name": body["name"]}
                )
            if self.path == "/api/dashboards/db":
                if error := _check_dashboard_body(body):
                    return self._reply(400, {"message": error})
                uid = body["dashboard"]["uid"]
                state.dashboards[uid] = body
                return self._reply(200, {"id": 1, "uid": uid, "url": f"/d/{uid}/x", "status": "success", "version": 1})
            if self.path == "/api/annotations":
                state.first_annotation_seen.set()
                state.release_annotations.wait(timeout=30)
                if error := _check_annotation_body(body):
                    return self._reply(400, {"message": error})
                if state.annotation_status != 200:
                    return self._reply(state.annotation_status, {"message": "internal error"})
                state.annotations.append(body)
                return self._reply(200, {"message": "Annotation added", "id": len(state.annotations)})
            self._reply(404, {"message": "Not found"})

        def do_PUT(self) -> None:  # noqa: N802
            body = self._record()["json"] or {}
            prefix = "/api/datasources/"
            if self.path.startswith(prefix) and self.path[len(prefix) :].isdigit():
                if error := _check_datasource_body(body):
                    return self._reply(400, {"message": error})
                ds_id = int(self.path[len(prefix) :])
                state.datasources[body["name"]] = {**body, "id": ds_id}
                return self._reply(200, {"message": "Datasource updated", "id": ds_id, "name": body["name"]})
            self._reply(404, {"message": "Not found"})

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


@pytest.fixture
def fake_grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()
    state.release_annotations.set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release_annotations.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _push(fake: FakeGrafana, **kwargs: Any) -> grafana.PushSummary:
    return grafana.push_dashboards(
        fake.url, TOKEN, REPO_DASHBOARDS, "http://prometheus:9090", "http://collector:8428", **kwargs
    )


def test_push_creates_datasources_and_dashboards(fake_grafana: FakeGrafana) -> None:
    summary = _push(fake_grafana, folder_uid="ml-runs", collector_token="read-token")
    assert sorted(summary.datasources_created) == ["numwatch Prometheus", "numwatch collector"]
    assert summary.datasources_updated == []
    assert sorted(summary.dashboards) == ["numwatch-overview", "numwatch-run"]
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in fake_grafana.requests)
    assert fake_grafana.paths("GET") == [
        "/api/datasources/name/numwatch%20Prometheus",
        "/api/datasources/name/numwatch%20collector",
    ]
    prometheus = fake_grafana.datasources["numwatch Prometheus"]
    assert (prometheus["type"], prometheus["uid"], prometheus["url"]) == (
        "prometheus",
        "numwatch-prometheus",
        "http://prometheus:9090",
    )
    collector = fake_grafana.datasources["numwatch collector"]
    assert collector["type"] == "yesoreyeram-infinity-datasource" and collector["uid"] == "numwatch-collector"
    assert collector["jsonData"] == {"allowedHosts": ["http://collector:8428"], "auth_method": "bearerToken"}
    assert collector["secureJsonData"] == {"bearerToken": "read-token"}
    run = fake_grafana.dashboards["numwatch-run"]
    assert run["overwrite"] is True and run["folderUid"] == "ml-runs"
    committed = json.loads((REPO_DASHBOARDS / "numwatch-run.json").read_text())
    assert run["dashboard"] == {**committed, "id": None}


def test_second_push_updates_in_place(fake_grafana: FakeGrafana) -> None:
    _push(fake_grafana)
    summary = _push(fake_grafana)
    assert summary.datasources_created == []
    assert sorted(summary.datasources_updated) == ["numwatch Prometheus", "numwatch collector"]
    puts = [r for r in fake_grafana.requests if r["method"] == "PUT"]
    assert sorted(r["path"] for r in puts) == ["/api/datasources/1", "/api/datasources/2"]
    assert all("secureJsonData" not in r["json"] for r in puts)  # no token given this time
    assert len(fake_grafana.paths("POST")) == 2 + 2 + 2  # datasources once, dashboards twice


def test_push_from_the_cli(fake_grafana: FakeGrafana, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="numwatch")
    grafana.add_grafana_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["grafana", "push", "--url", fake_grafana.url, "--token", TOKEN, "--collector-url", "http://numwatch:8428"]
    )
    assert args.func(args) == 0
    assert fake_grafana.datasources["numwatch collector"]["url"] == "http://numwatch:8428"
    assert set(fake_grafana.dashboards) == {"numwatch-overview", "numwatch-run"}


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (None, "no dashboard JSON files"),
        ("{not json", "not a readable JSON file"),
        ("[1, 2]", "must be a JSON object"),
        ('{"uid": "x", "title": "t"}', "'panels' must be a list"),
    ],
)
def test_push_sends_nothing_when_a_dashboard_file_is_bad(
    fake_grafana: FakeGrafana, tmp_path: Path, capsys, content: str | None, complaint: str
) -> None:
    """The files are checked before the first request: a bad file never leaves Grafana half-updated."""
    dashboards = tmp_path / "dashboards"
    dashboards.mkdir()
    if content is not None:
        (dashboards / "a-good.json").write_text((REPO_DASHBOARDS / "numwatch-run.json").read_text())
        (dashboards / "b-bad.json").write_text(content)
    parser = argparse.ArgumentParser(prog="numwatch")
    grafana.add_grafana_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["grafana", "push", "--url", fake_grafana.url, "--token", TOKEN, "--dashboards-dir", str(dashboards)]
    )
    assert args.func(args) == 2
    assert complaint in capsys.readouterr().err
    assert fake_grafana.requests == []


def test_annotation_sink_posts_events(fake_grafana: FakeGrafana) -> None:
    sink = AnnotationSink(fake_grafana.url, TOKEN, dashboard_uid="numwatch-run")
    events = [
        {
            "step": 41,
            "rank": 0,
            "kind": "nonfinite_grad",
            "details": {"tensors": ["fc1.weight"]},
            "time": 1_700_000_000.123,
        },
        {"step": 42, "rank": 1, "kind": "loss_scale_backoff", "details": {}, "time": 1.0, "time_ms": 1_700_000_001_500},
    ]
    assert all(sink.post(event, "gpt-fp16") for event in events)
    sink.close()
    assert (sink.posted, sink.failed, sink.dropped) == (2, 0, 0)
    first, second = fake_grafana.annotations
    assert first == {
        "panelId": None,
        "time": 1_700_000_000_123,
        "timeEnd": 1_700_000_000_123,
        "tags": ["numwatch", "nonfinite_grad", "gpt-fp16"],
        "text": 'nonfinite_grad at step 41 (rank 0): {"tensors": ["fc1.weight"]}',
        "dashboardUID": "numwatch-run",
    }
    assert (second["time"], second["tags"][1], second["text"]) == (
        1_700_000_001_500,
        "loss_scale_backoff",
        "loss_scale_backoff at step 42 (rank 1)",
    )
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in fake_grafana.requests)


def test_annotation_sink_never_blocks_and_counts_drops(fake_grafana: FakeGrafana) -> None:
    """With Grafana stuck on the first post, the queue fills and further posts return
    False at once instead of waiting."""
    fake_grafana.release_annotations.clear()
    sink = AnnotationSink(fake_grafana.url, TOKEN, max_queue=2)
    event = {"step": 1, "rank": 0, "kind": "skipped_step", "details": {}, "time": 1_700_000_000.0}
    assert sink.post(event, "r")
    assert fake_grafana.first_annotation_seen.wait(timeout=30)  # the worker holds event 1
    accepted = [sink.post({**event, "step": step}, "r") for step in range(2, 12)]
    assert accepted == [True, True] + [False] * 8
    assert sink.dropped == 8
    fake_grafana.release_annotations.set()
    sink.close()
    assert (sink.posted, sink.failed) == (3, 0)
    assert [a["text"] for a in fake_grafana.annotations] == [
        f"skipped_step at step {step} (rank 0)" for step in (1, 2, 3)
    ]


def test_annotation_sink_counts_failures(fake_grafana: FakeGrafana) -> None:
    fake_grafana.annotation_status = 500
    event = {"step": 1, "rank": 0, "kind": "grad_explosion", "details": {}, "time": 1_700_000_000.0}
    failing = AnnotationSink(fake_grafana.url, TOKEN)
    unreachable = AnnotationSink(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2.0)
    for sink in (failing, unreachable):
        assert sink.post(event, "r") and sink.post(event, "r")
        sink.close()
        assert (sink.posted, sink.failed, sink.dropped) == (0, 2, 0)
    assert not failing.post(event, "r") and failing.dropped == 1  # closed sinks drop
