"""The sender thread against a real (tiny, stdlib) HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import torch

import numwatch
from numwatch import protocol
from numwatch.delivery.transport import Transport
from numwatch.step.documents import StepDocuments
from tests.support.collector_docs import values
from tests.support.watch_helpers import BackwardInjection, batch, read_spool, small_model


class Collector:
    """Records every POST; ``respond(path, body)`` picks the status code."""

    def __init__(self, port: int = 0, respond: Callable[[str, dict], int] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.respond = respond or (lambda path, body: 200)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = protocol.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = collector.respond(self.path, body)
                if 200 <= status < 300:
                    collector.requests.append((self.path, dict(self.headers), body))
                payload = json.dumps({"ok": status < 300}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def steps(self) -> list[int]:
        return [s["step"] for path, _, body in self.requests if path.endswith("/batches") for s in body["steps"]]

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]


@pytest.fixture
def collector():
    server = Collector()
    yield server
    server.stop()


class FakeStep:
    """A step source whose documents are known in advance."""

    def __init__(self, number: int, release: threading.Event | None = None) -> None:
        self.step_number = number
        self.release = release
        self.building = threading.Event()

    def build(self) -> StepDocuments:
        self.building.set()
        if self.release is not None:
            assert self.release.wait(10)
        return StepDocuments({"step": self.step_number, "loss": protocol.encode_float(math.inf)})


def _run_document(run: str = "t") -> dict[str, Any]:
    return dict(protocol.run_document(run, format="fp32", tensors=[], project="p", started_at=0.0))


def _wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_watcher_streams_run_once_and_batches_with_bearer(tmp_path, collector):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    watcher = numwatch.watch(
        model, optimizer, run="net/1", url=collector.url, token="s3cret", spool_dir=tmp_path, on_nonfinite="ignore"
    )
    inject = BackwardInjection(model[2].bias, (slice(0, 1),), [math.inf], {3})
    for step in range(1, 6):
        inject.step = step
        x, y = batch(step)
        (model(x) - y).pow(2).mean().backward()
        watcher.log(loss=math.nan if step == 3 else float(step))
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    assert collector.paths()[0] == "/api/v1/runs" and collector.paths().count("/api/v1/runs") == 1
    assert set(collector.paths()[1:]) == {"/api/v1/runs/net%2F1/batches"}
    assert all(headers["Authorization"] == "Bearer s3cret" for _, headers, _ in collector.requests)
    assert collector.steps() == [1, 2, 3, 4, 5]
    batches = [body for path, _, body in collector.requests if path.endswith("/batches")]
    assert batches[-1]["status"] == "finished" and all(b["status"] == "running" for b in batches[:-1])
    step3 = next(s for b in batches for s in b["steps"] if s["step"] == 3)
    assert step3["loss"] == "NaN" and math.isnan(protocol.decode_float(step3["loss"]))
    norms = values(step3["tensors"]["grad_norm"], "<f4", 4)
    assert norms[3] == np.inf and np.isfinite(norms[:3]).all()
    assert protocol.decode_float(step3["global_grad_norm"]) == math.inf
    assert step3["tensors"]["inf_count"] and values(step3["tensors"]["inf_count"], "<i8").tolist() == [0, 0, 0, 1]
    assert not watcher.spool_dir.exists()  # everything acknowledged: nothing spooled
    assert watcher.transport.sent_batches == len(batches)


@pytest.mark.parametrize("outage", ["refused", "503"])
def test_outage_spools_then_drains_in_order_without_duplicates(tmp_path, outage):
    down = outage == "refused"
    server = Collector(respond=lambda path, body: 503 if state["down"] else 200)
    state = {"down": True}
    port = server.server.server_address[1]
    if down:
        server.stop()
    transport = Transport(
        _run_document(),
        url=server.url,
        token=None,
        spool_dir=tmp_path,
        batch_steps=2,
        batch_seconds=0.05,
        retry_seconds=0.05,
    )
    try:
        for number in range(1, 6):
            transport.submit(FakeStep(number))
        assert transport.flush(10)
        assert transport.spooled_batches >= 3 and transport.sent_batches == 0
        if down:
            server = Collector(port=port, respond=lambda path, body: 200)
        state["down"] = False
        for number in range(6, 9):
            transport.submit(FakeStep(number))
        assert _wait_until(lambda: len(server.steps()) == 8)
        assert transport.close("finished", 10)
    finally:
        server.stop()
    assert server.steps() == list(range(1, 9))
    assert server.paths().count("/api/v1/runs") == 1 and server.paths()[0] == "/api/v1/runs"
    assert server.requests[-1][2]["status"] == "finished"
    assert list(numwatch.iter_spool(tmp_path, pending_only=True)) == []
    assert [
        body["steps"][0]["step"] for kind, body in numwatch.iter_spool(tmp_path) if kind == "batch" and body["steps"]
    ][:1] == [1]


def test_rejected_batches_are_counted_not_retried(tmp_path):
    server = Collector(respond=lambda path, body: 422 if path.endswith("/batches") else 201)
    transport = Transport(
        _run_document(), url=server.url, token=None, spool_dir=tmp_path, batch_steps=1, batch_seconds=0.05
    )
    try:
        for number in range(1, 4):
            transport.submit(FakeStep(number))
        transport.close("finished", 10)
    finally:
        server.stop()
    assert transport.rejected_documents == 4  # three steps and the final (empty) batch
    assert transport.spooled_batches == 0 and not tmp_path.joinpath("000001.jsonl").exists()


def test_full_queue_goes_to_the_spool_without_blocking(tmp_path):
    release = threading.Event()
    transport = Transport(
        _run_document(), url=None, token=None, spool_dir=tmp_path, batch_steps=1, batch_seconds=0.05, queue_steps=1
    )
    first = FakeStep(1, release)
    transport.submit(first)
    assert first.building.wait(10)  # the sender is busy with step 1
    transport.submit(FakeStep(2))  # fills the queue
    transport.submit(FakeStep(3))  # queue full: spooled on the caller's thread
    assert transport.spooled_batches == 1
    release.set()
    transport.close("finished", 10)
    spooled = read_spool(tmp_path)
    assert sorted(s["step"] for s in spooled.steps) == [1, 2, 3] and transport.dropped_steps == 0
    assert spooled.runs[0]["run"] == "t" and spooled.statuses[-1] == "finished"


def test_unwritable_spool_counts_dropped_and_reports_it(tmp_path, collector):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    release = threading.Event()
    transport = Transport(
        _run_document(),
        url=collector.url,
        token=None,
        spool_dir=blocker / "spool",
        batch_steps=1,
        batch_seconds=0.05,
        queue_steps=1,
    )
    first = FakeStep(1, release)
    transport.submit(first)
    assert first.building.wait(10)
    transport.submit(FakeStep(2))
    transport.submit(FakeStep(3))  # queue full and the spool cannot be created
    assert transport.dropped_steps == 1
    release.set()
    transport.close("finished", 10)
    assert collector.steps() == [1, 2]
    events = [e for _, _, body in collector.requests if "events" in body for e in body["events"]]
    assert [(e["kind"], e["details"]["dropped_steps"]) for e in events] == [("monitoring_dropped", 1)]


def test_device_stack_round_trips_floats_and_ints_exactly():
    from numwatch.step.hostcopy import DeviceStack

    stack = DeviceStack()
    floats = torch.tensor([[1.5, math.nan], [math.inf, -math.inf]], dtype=torch.float32)
    ints = torch.tensor([2**62 + 1, -7, 0], dtype=torch.int64)
    stack.add("floats", floats)
    stack.add("ints", ints)
    stack.add("flag", torch.tensor(True))
    stack.add("half", torch.tensor([65504.0], dtype=torch.float16))
    with pytest.raises(ValueError, match="twice"):
        stack.add("ints", ints)
    host = stack.to_host()
    assert host.names() == ["floats", "ints", "flag", "half"]
    np.testing.assert_array_equal(host.get("floats", "<f4"), floats.numpy())
    assert host.get("ints").tolist() == [2**62 + 1, -7, 0] and host.get("ints").dtype == np.int64
    assert host.scalar("flag") == 1.0 and host.get("half").tolist() == [65504.0]


def test_leftover_spool_of_an_earlier_process_is_uploaded(tmp_path):
    server = Collector()
    url = server.url
    port = server.server.server_address[1]
    server.stop()  # the collector is down for the whole first "process"
    first = Transport(_run_document(), url=url, token=None, spool_dir=tmp_path, batch_seconds=0.05)
    for number in range(1, 4):
        first.submit(FakeStep(number))
    first.close("crashed", 10)
    assert first.sent_batches == 0 and len(list(numwatch.iter_spool(tmp_path, pending_only=True))) >= 2
    server = Collector(port=port)
    try:
        second = Transport(_run_document(), url=url, token=None, spool_dir=tmp_path, batch_seconds=0.05)
        second.submit(FakeStep(4))
        second.close("finished", 10)
    finally:
        server.stop()
    assert server.steps() == [1, 2, 3, 4]
    assert [body["status"] for path, _, body in server.requests if path.endswith("/batches")][-2:] == [
        "crashed",
        "finished",
    ]
    assert list(numwatch.iter_spool(tmp_path, pending_only=True)) == []


def test_url_token_and_spool_default_to_the_environment(tmp_path, collector, monkeypatch):
    monkeypatch.setenv("NUMWATCH_URL", collector.url)
    monkeypatch.setenv("NUMWATCH_TOKEN", "from-env")
    monkeypatch.setenv("NUMWATCH_SPOOL_DIR", str(tmp_path))
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with numwatch.watch(model, optimizer, run="env") as watcher:
        x, y = batch(0)
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
    assert watcher.spool_dir == tmp_path / f"env.{watcher.instance}" / "rank0"
    assert collector.steps() == [1]
    assert {headers["Authorization"] for _, headers, _ in collector.requests} == {"Bearer from-env"}
