"""A fake Grafana: a real local HTTP server that checks each request the way Grafana's documented
HTTP API accepts it (grafana-client uses niquests, which responses/requests_mock cannot intercept)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "glsa_test_token"


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


@contextmanager
def serving_fake_grafana() -> Iterator[FakeGrafana]:
    """A fake Grafana on a free loopback port, stopped on exit."""
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
