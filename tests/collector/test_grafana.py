"""numwatch.monitor.ops.grafana and the annotation sink against a fake Grafana (tests/support/grafana.py):
a real local HTTP server that checks each request the way Grafana's documented HTTP API accepts it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from numwatch.monitor.metrics.annotations import AnnotationSink
from numwatch.monitor.ops import grafana
from tests.support.grafana import TOKEN, FakeGrafana
from tests.support.promstack import free_port

REPO_DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"


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


def test_push_reads_grafana_from_the_collector_settings(fake_grafana: FakeGrafana, monkeypatch) -> None:
    """Without --url and --token, the push goes where the collector posts its annotations (NUMWATCH_GRAFANA_*)."""
    monkeypatch.setenv("NUMWATCH_GRAFANA_URL", fake_grafana.url)
    monkeypatch.setenv("NUMWATCH_GRAFANA_TOKEN", TOKEN)
    parser = argparse.ArgumentParser(prog="numwatch")
    grafana.add_grafana_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["grafana", "push"])
    assert args.func(args) == 0
    assert set(fake_grafana.dashboards) == {"numwatch-overview", "numwatch-run"}
    assert all(r["authorization"] == f"Bearer {TOKEN}" for r in fake_grafana.requests)


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
