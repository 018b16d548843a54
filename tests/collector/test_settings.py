"""One Settings class: detector thresholds nested in it, read from NUMWATCH_* by the server and by every CLI command."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import ValidationError

from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.monitor.ingest.batches import register_run, store_batch
from numwatch.monitor.ingest.schemas import BatchDocument, RunDocument
from numwatch.monitor.metrics.exposition import NumwatchCollector
from numwatch.monitor.reads import overview, queries
from numwatch.monitor.reads.queries import find_run
from numwatch.monitor.settings import LOOPBACK_HOSTS, Settings
from numwatch.monitor.store import db
from numwatch.monitor.store.auth import EVERYTHING
from tests.support.collector_docs import batch_doc, run_doc, step_doc


def test_detector_thresholds_read_their_env_names(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("NUMWATCH_")]:
        monkeypatch.delenv(name)
    defaults = Settings().detect
    assert defaults == DetectorConfig() and defaults.vanishing_floor == 1e-10 and defaults.window == 50
    monkeypatch.setenv("NUMWATCH_DETECT_VANISHING_FLOOR", "1e-8")
    monkeypatch.setenv("NUMWATCH_DETECT_WINDOW", "7")
    monkeypatch.setenv("NUMWATCH_STALE_AFTER_SECONDS", "3")
    settings = Settings()
    assert (settings.detect.vanishing_floor, settings.detect.window, settings.detect.min_history) == (1e-8, 7, 10)
    assert settings.stale_after_seconds == 3.0
    monkeypatch.setenv("NUMWATCH_DETECT_WINDOWS", "7")
    with pytest.raises(ValidationError, match="windows"):
        Settings()  # a misspelt threshold is an error, not silently the default


def test_auth_off_is_refused_where_others_can_reach_the_collector(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("NUMWATCH_")]:
        monkeypatch.delenv(name)
    for host in LOOPBACK_HOSTS:
        assert not Settings(host=host, auth="off").auth_enabled
    with pytest.raises(ValidationError, match="refusing to serve 0.0.0.0 without auth.*--insecure-no-auth"):
        Settings(host="0.0.0.0", auth="off")
    assert not Settings(host="0.0.0.0", auth="off", insecure_no_auth=True).auth_enabled
    assert Settings(host="0.0.0.0").auth_enabled
    # The environment is held to the same rule as arguments.
    monkeypatch.setenv("NUMWATCH_HOST", "192.0.2.7")
    monkeypatch.setenv("NUMWATCH_AUTH", "off")
    with pytest.raises(ValidationError, match="refusing to serve 192.0.2.7 without auth"):
        Settings()
    monkeypatch.setenv("NUMWATCH_INSECURE_NO_AUTH", "1")
    assert not Settings().auth_enabled


def test_the_server_judges_with_the_configured_thresholds(collector) -> None:
    # Norms 3x their median: an explosion at factor 2 after 3 steps, not at the defaults (10x after 10).
    steps = [step_doc(s, norms=[1.0, 1.0, 1.0]) for s in range(1, 5)] + [step_doc(5, norms=[3.0, 3.0, 3.0])]
    found = {}
    for label, env in (
        ("configured", {"NUMWATCH_DETECT_EXPLOSION_FACTOR": "2", "NUMWATCH_DETECT_MIN_HISTORY": "3"}),
        ("defaults", {}),
    ):
        with httpx.Client(base_url=collector(None, **env), timeout=30) as client:
            client.post("/api/v1/runs", json=run_doc()).raise_for_status()
            client.post("/api/v1/runs/r1/batches", json=batch_doc(steps=steps)).raise_for_status()
            found[label] = [
                (e["step"], e["details"].get("factor"))
                for e in client.get("/api/v1/runs/r1/events", params={"kind": "grad_explosion"}).json()
            ]
    assert found["configured"] == [(5, pytest.approx(3.0, rel=1e-6))]
    assert found["defaults"] == []


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("NUMWATCH_")} | env
    return subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


def test_one_stale_rule_and_runs_show_follow_numwatch_stale_after_seconds(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'stale.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.make_session_factory(engine)() as session:
        # Rank 0 holds the highest step but went quiet 600 s ago; rank 1 stepped 60 s ago: the run's last sign of life.
        for rank, step, age in ((0, 9, 600.0), (1, 5, 60.0)):
            register_run(session, RunDocument.model_validate(run_doc(rank=rank)), EVERYTHING)
            batch = BatchDocument.model_validate(batch_doc(rank=rank, steps=[step_doc(step, time=time.time() - age)]))
            store_batch(session, find_run(session, "r1", EVERYTHING), batch, DetectorConfig())
        session.commit()
        # The read API's summary, the live tail (no steps after 100) and /metrics judge by the same rule.
        collector = NumwatchCollector(
            db.make_session_factory(engine), Settings(database_url=url, stale_after_seconds=30, metrics_cache_seconds=0)
        )
        run_info = next(metric for metric in collector.collect() if metric.name == "numwatch_run_info")
        run = find_run(session, "r1", EVERYTHING)
        for stale_after, expected in ((30.0, "stale"), (120.0, "running")):
            assert queries.run_summary(session, run, stale_after)["status"] == expected
            assert overview.tail(session, run, 0, 100, stale_after)["status"] == expected
        assert [sample.labels["status"] for sample in run_info.samples] == ["stale"]
    engine.dispose()

    def status(command: str, **env: str) -> str:
        result = _cli(command, *(["r1"] if command == "show" else []), NUMWATCH_DATABASE_URL=url, **env)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if line.startswith("r1 ") or line.startswith("status "))
        return line.split()[2] if command == "runs" else line.split()[1].rstrip(",")

    assert status("runs") == status("show") == "running"  # the 300 s default
    assert (
        status("runs", NUMWATCH_STALE_AFTER_SECONDS="30")
        == status("show", NUMWATCH_STALE_AFTER_SECONDS="30")
        == "stale"
    )
    assert status("runs", NUMWATCH_STALE_AFTER_SECONDS="120") == "running"  # rank 1 is recent enough
    for command in ("show", "export"):
        missing = _cli(command, "nope", NUMWATCH_DATABASE_URL=url)
        assert missing.returncode == 1 and "unknown run 'nope'" in missing.stderr, missing.stderr
    exported = _cli(
        "export",
        "r1",
        "--output",
        str(tmp_path / "r1.html"),
        NUMWATCH_DATABASE_URL=url,
        NUMWATCH_STALE_AFTER_SECONDS="30",
    )
    assert exported.returncode == 0, exported.stderr
    assert '"status":"stale"' in (tmp_path / "r1.html").read_text()  # the page's data, judged with the same setting
