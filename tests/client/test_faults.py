"""Breaking things on purpose: the collector killed, slow or down, the spool's disk full, the
training process killed, PostgreSQL restarted. Real servers on loopback; every wait bounded.

The client's transport constants are shrunk (small batches, short timeouts and retries) so a
run of a few hundred steps crosses every fault several times in seconds.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import torch

import numwatch
from numwatch import protocol
from numwatch.delivery import transport
from numwatch.delivery.spool import read_entries
from numwatch.delivery.sync import pending_documents
from numwatch.monitor.ops import stack
from numwatch.monitor.store import db
from tests.support import slow_collector
from tests.support.binaries import missing
from tests.support.collector_docs import batch_doc, run_doc, step_doc
from tests.support.watch_helpers import batch, small_model

READY_TIMEOUT_S = 60.0
RECOVERY_TIMEOUT_S = 60.0
NAN_LOSS_STEP = 50


@pytest.fixture(autouse=True)
def fast_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "BATCH_STEPS", 8)
    monkeypatch.setattr(transport, "BATCH_SECONDS", 0.05)
    monkeypatch.setattr(transport, "RETRY_SECONDS", 0.05)
    monkeypatch.setattr(transport, "MAX_RETRY_SECONDS", 0.4)
    monkeypatch.setattr(transport, "HTTP_TIMEOUT_SECONDS", 2.0)


class KillableCollector:
    """``numwatch serve`` on a fixed loopback port that a test kills (SIGKILL) and starts again."""

    def __init__(self, workdir: Path, database_url: str, response_delay: float | None = None, **env: str) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.response_delay = response_delay  # seconds each batch answer waits (a slow collector), None: none
        self.env = env
        self.port = stack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)
        db.upgrade(database_url)

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"collector-{self.starts}.log", "wb")
        if self.response_delay is None:
            argv = stack.collector_argv(self.port, self.database_url)
        else:
            argv = slow_collector.argv(self.port, self.database_url, self.response_delay)
        self.process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        process = self.process
        assert stack.wait_for(
            lambda: process.poll() is not None or stack.answers_ok(f"{self.url}/readyz"), READY_TIMEOUT_S, 0.05
        )
        assert process.poll() is None, (self.workdir / f"collector-{self.starts}.log").read_text()[-3000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown, requests in flight die with the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def killable(tmp_path: Path):
    """Factory of :class:`KillableCollector` (not started); all stopped at the end of the test."""
    made: list[KillableCollector] = []

    def make(database_url: str | None = None, response_delay: float | None = None, **env: str) -> KillableCollector:
        workdir = tmp_path / f"killable-{len(made)}"
        database_url = database_url or f"sqlite:///{workdir / 'numwatch.db'}"
        made.append(KillableCollector(workdir, database_url, response_delay, **env))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def train(
    url: str | None,
    spool_root: Path,
    run: str,
    steps: int,
    at_step: dict[int, Callable[[numwatch.Watcher], Any]] | None = None,
) -> numwatch.Watcher:
    """A deterministic small run (same numbers every time); ``at_step[n](watcher)`` runs after step n.
    Step NAN_LOSS_STEP logs a NaN loss, so the run has a detector event to deliver exactly once."""
    torch.manual_seed(0)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = numwatch.watch(
        model,
        optimizer,
        run=run,
        url=url,
        spool_dir=spool_root,
        histogram_every=16,
        format_every=4,
        on_nonfinite="ignore",
    )
    for step in range(1, steps + 1):
        inputs, targets = batch(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        watcher.log(loss=math.nan if step == NAN_LOSS_STEP else loss.item())
        optimizer.step()
        if at_step and step in at_step:
            at_step[step](watcher)
    watcher.close()
    return watcher


def stored(url: str, run: str) -> dict[str, Any]:
    """Everything the collector holds for ``run``, minus arrival times (which differ between runs)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        summary = client.get(f"/api/v1/runs/{run}").json()
        steps = []
        for step in range(1, summary["last_step"] + 1):
            record = client.get(f"/api/v1/runs/{run}/steps/{step}")
            steps.append(record.json() if record.status_code == 200 else None)
        events = client.get(f"/api/v1/runs/{run}/events").json()
    for record in steps:
        if record is not None:
            for key in ("run", "time", "step_time", "events"):
                record.pop(key, None)
    untimed_events = sorted((e["step"], e["kind"], e["rank"]) for e in events)
    counters = {key: summary[key] for key in summary if key.endswith("_total")}
    return {"counters": counters, "status": summary["status"], "steps": steps, "events": untimed_events}


def conflict_count(database_url: str) -> int:
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text("SELECT count(*) FROM conflicts")).scalar_one()
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """What a healthy collector stores for ``train(...)`` runs, by step count."""
    workdir = tmp_path_factory.mktemp("reference")
    results: dict[int, dict[str, Any]] = {}
    with stack.running_collector(workdir) as url:
        for steps in (40, 300):
            run = f"reference-{steps}"
            watcher = train(url, workdir / "spool", run, steps)
            assert watcher.dropped_steps == 0 and watcher.transport.spooled_batches == 0
            results[steps] = stored(url, run)
    return results


def test_reference_run_is_what_the_client_measured(reference) -> None:
    # Guards the comparisons below: the healthy run has every step, the NaN loss and its event.
    healthy = reference[300]
    assert healthy["counters"]["steps_total"] == 300 and healthy["status"] == "finished"
    assert [record["step"] for record in healthy["steps"]] == list(range(1, 301))
    assert math.isnan(protocol.decode_float(healthy["steps"][NAN_LOSS_STEP - 1]["loss"]))
    assert (NAN_LOSS_STEP, "nonfinite_loss", 0) in healthy["events"]


@pytest.mark.timeout(300)
def test_collector_sigkilled_and_restarted_stores_every_step_exactly_once(
    database_url, killable, tmp_path, reference
) -> None:
    server = killable(database_url)
    server.start()
    # Killed three times, each down for 20 steps (one kill lands right after the NaN step).
    kill, start = (lambda watcher: server.kill()), (lambda watcher: server.start())
    schedule = {60: kill, 80: start, NAN_LOSS_STEP: kill, 55: start, 200: kill, 220: start}
    watcher = train(server.url, tmp_path / "spool", "reference-300", 300, schedule)
    assert server.starts == 4
    assert watcher.dropped_steps == 0 and watcher.transport.rejected_documents == 0
    assert watcher.transport.spooled_batches > 0  # the outages really happened while training
    assert pending_documents(tmp_path / "spool") == 0
    assert stored(server.url, "reference-300") == reference[300]
    assert conflict_count(database_url) == 0  # re-sent batches were identical, never conflicting


def test_collector_down_for_the_whole_run_then_sync_stores_what_a_live_run_stores(
    killable, tmp_path, reference
) -> None:
    server = killable()
    spool_root = tmp_path / "spool"
    watcher = train(server.url, spool_root, "reference-40", 40)  # nothing listens on server.url yet
    assert watcher.dropped_steps == 0 and watcher.transport.sent_batches == 0
    assert pending_documents(spool_root) > 0
    server.start()
    result = subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", "sync", "--url", server.url, "--spool-dir", str(spool_root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert pending_documents(spool_root) == 0
    assert stored(server.url, "reference-40") == reference[40]


def test_slow_collector_keeps_the_queue_bounded_spools_and_recovers(killable, tmp_path, reference, monkeypatch) -> None:
    queue_steps = 16
    monkeypatch.setattr(transport, "QUEUE_STEPS", queue_steps)
    monkeypatch.setattr(transport, "HTTP_TIMEOUT_SECONDS", 0.5)
    server = killable(response_delay=1.5)  # answers after the client gave up
    server.start()
    queue_depths: list[int] = []

    def record_queue_depth(watcher: numwatch.Watcher) -> None:
        queue_depths.append(watcher.transport.queued_steps)

    def become_fast(watcher: numwatch.Watcher) -> None:
        server.stop()
        server.response_delay = None
        server.start()

    schedule: dict[int, Callable[[numwatch.Watcher], Any]] = {step: record_queue_depth for step in range(1, 240)}
    schedule[240] = become_fast
    watcher = train(server.url, tmp_path / "spool", "reference-300", 300, schedule)
    assert max(queue_depths) <= queue_steps and max(queue_depths) > 0
    assert watcher.transport.spooled_batches > 0 and watcher.dropped_steps == 0
    assert pending_documents(tmp_path / "spool") == 0
    assert stored(server.url, "reference-300") == reference[300]


@pytest.fixture
def full_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tiny tmpfs filled to the last byte: every write there fails with ENOSPC.
    Mounting needs root (CI runs as root); elsewhere the test skips, or fails when binaries are required."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "numwatch-test", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        with open(mount_point / "filler", "wb", buffering=0) as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(bytes(4096))
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("kind", ["disk full", "not a directory"])
def test_unwritable_spool_loses_only_what_it_must_and_says_so(kind, killable, tmp_path, request, caplog) -> None:
    server = killable()
    if kind == "disk full":
        spool_root = request.getfixturevalue("full_filesystem")
    else:
        # A file where the spool root should be: mkdir of the run's directory fails, even for root.
        spool_root = tmp_path / "spool"
        spool_root.write_text("not a directory")

    def flush_then_start_collector(watcher: numwatch.Watcher) -> None:
        watcher.flush()
        server.start()

    with caplog.at_level(logging.ERROR, logger="hooks"):
        # Collector down for steps 1-30 and nowhere to spool them; up for steps 31-40.
        watcher = train(server.url, spool_root, "full", 40, {30: flush_then_start_collector})
    assert watcher.dropped_steps == 30
    message = next(r.getMessage() for r in caplog.records if "lost" in r.getMessage())
    assert "training goes on" in message and "dropped_steps" in message
    assert ("No space left on device" if kind == "disk full" else "Not a directory") in message
    with httpx.Client(base_url=server.url, timeout=30) as client:
        summary = client.get("/api/v1/runs/full").json()
        assert summary["steps_total"] == 10 and summary["status"] == "finished"
        events = client.get("/api/v1/runs/full/events").json()
    dropped = [e for e in events if e["kind"] == "monitoring_dropped"]
    assert len(dropped) == 1 and dropped[0]["details"]["dropped_steps"] == 30


TRAINING_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    import numwatch
    from numwatch.delivery import transport
    transport.BATCH_STEPS, transport.BATCH_SECONDS = 4, 0.02
    url, spool_root = (sys.argv[1] or None), sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = numwatch.watch(
        model, optimizer, run="killed", url=url, spool_dir=spool_root, format_every=2, histogram_every=5
    )
    for step in range(1, 100_000):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 3)).backward()
        optimizer.step()
        if step == 20:
            watcher.flush()
            print("flushed", flush=True)
        time.sleep(0.002)
""")


def _train_until_killed(url: str | None, spool_root: Path) -> None:
    """Start a training process, wait until it has flushed 20 steps, go on a little, SIGKILL it."""
    process = subprocess.Popen(
        [sys.executable, "-c", TRAINING_SCRIPT, url or "", str(spool_root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "flushed"
        threading.Event().wait(0.7)  # mid-run: spool writes and POSTs in flight
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def test_killed_training_leaves_a_readable_spool_that_syncs(killable, tmp_path) -> None:
    spool_root = tmp_path / "spool"
    _train_until_killed(None, spool_root)
    (directory,) = spool_root.glob("killed.*/rank0")  # one directory per watching process
    entries = list(read_entries(directory))
    assert entries[0].kind == "run" and all(entry.kind == "batch" for entry in entries[1:])
    spooled_steps = [step["step"] for entry in entries[1:] for step in entry.body["steps"]]
    assert spooled_steps == list(range(1, len(spooled_steps) + 1)) and len(spooled_steps) >= 20
    server = killable()
    server.start()
    result = subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", "sync", "--url", server.url, "--spool-dir", str(spool_root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = httpx.get(f"{server.url}/api/v1/runs/killed", timeout=30).json()
    assert summary["steps_total"] == len(spooled_steps) and summary["last_step"] == spooled_steps[-1]


def test_killed_training_run_turns_stale_after_the_timeout(killable, tmp_path) -> None:
    server = killable(NUMWATCH_STALE_AFTER_SECONDS="2")
    server.start()
    _train_until_killed(server.url, tmp_path / "spool")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/api/v1/runs/killed").json()["steps_total"] >= 20
        assert stack.wait_for(lambda: client.get("/api/v1/runs/killed").json()["status"] == "stale", 15, 0.2)
        assert 'status="stale"' in next(
            line
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("numwatch_run_info{") and 'run="killed"' in line
        )


@pytest.mark.timeout(300)
def test_postgresql_restart_gives_503_then_ingest_resumes_by_itself(restartable_postgres, collector) -> None:
    url = collector(restartable_postgres.url)
    codes: list[int] = []
    stored_steps: list[int] = []
    stop = threading.Event()

    def post_batches() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/api/v1/runs", json=run_doc()).status_code == 200
            step = 0
            while not stop.is_set():
                step += 1
                response = client.post(
                    "/api/v1/runs/r1/batches",
                    content=protocol.dumps(batch_doc(steps=[step_doc(step)])),
                    headers={"Content-Type": "application/json"},
                )
                codes.append(response.status_code)
                if response.status_code == 200:
                    stored_steps.append(step)
                stop.wait(0.02)

    poster = threading.Thread(target=post_batches, daemon=True)
    poster.start()
    try:
        assert stack.wait_for(lambda: len(stored_steps) >= 10, RECOVERY_TIMEOUT_S, 0.05)
        restartable_postgres.stop()
        assert stack.wait_for(lambda: codes.count(503) >= 5, RECOVERY_TIMEOUT_S, 0.05)
        readiness = httpx.get(f"{url}/readyz", timeout=30)
        assert readiness.status_code == 503 and "database unreachable" in readiness.json()["detail"]
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # alive, only not ready
        assert httpx.get(f"{url}/api/v1/runs/r1", timeout=30).status_code == 503
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 503
        before_restart = len(stored_steps)
        restartable_postgres.start()
        assert stack.wait_for(lambda: len(stored_steps) >= before_restart + 10, RECOVERY_TIMEOUT_S, 0.05)
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
    finally:
        stop.set()
        poster.join(30)
    assert set(codes) <= {200, 503}, f"unexpected status codes: {sorted(set(codes))}"
    summary = httpx.get(f"{url}/api/v1/runs/r1", timeout=30).json()
    assert summary["steps_total"] == len(stored_steps)
