"""Getting step documents to the collector without ever holding up training.

The training thread hands each step to :meth:`Transport.submit`, which never blocks: a
bounded queue feeds a daemon sender thread that builds the protocol documents, batches
them (up to ``batch_steps`` steps or ``batch_seconds``) and POSTs them with the standard
library. When there is no collector URL, or the collector is unreachable, documents go to
the on-disk spool instead; while the spool holds anything not yet acknowledged, new
batches are appended behind it and the spool is drained in order once the collector
answers again, so nothing is reordered, lost or sent twice by this process. Whatever could
not be queued nor spooled is counted (``dropped_steps``), logged once and reported as a
``monitoring_dropped`` event when possible.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from numwatch import protocol
from numwatch.delivery.spool import (
    SpoolWriter,
    discard_uploaded_segments,
    mark_uploaded,
    read_entries,
    read_uploaded_mark,
)
from numwatch.step.documents import StepDocuments

log = logging.getLogger(__name__)

BATCH_STEPS = 64
BATCH_SECONDS = 1.0
QUEUE_STEPS = 1024
HTTP_TIMEOUT_SECONDS = 5.0
RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 30.0


class StepSource(Protocol):
    """A step measured on the training thread, turned into documents on the sender thread."""

    step_number: int

    def build(self) -> StepDocuments: ...


class _Inbox:
    """What the training thread hands the sender: steps (at most ``capacity``) and requests.

    Handing over never wakes the sender by itself: a wake-up per step would hand it the GIL in
    the middle of the training thread's step. It wakes when a batch is full or a request
    arrives, else at its own deadline (:meth:`take`)."""

    def __init__(self, capacity: int, batch: int) -> None:
        self._items: collections.deque[StepSource | _Control] = collections.deque()
        self._steps = 0
        self._capacity = capacity
        self._batch = batch
        self._ready = threading.Event()
        self._lock = threading.Lock()

    @property
    def steps(self) -> int:
        return self._steps

    def put_step(self, source: StepSource) -> bool:
        """Queue a step; False when ``capacity`` steps wait already."""
        with self._lock:
            if self._steps >= self._capacity:
                return False
            self._items.append(source)
            self._steps += 1
            full = self._steps >= self._batch
        if full:
            self._ready.set()
        return True

    def put_request(self, control: _Control) -> None:
        with self._lock:
            self._items.append(control)
        self._ready.set()

    def take(self, limit: int, timeout: float) -> tuple[list[StepSource], list[_Control]]:
        """Up to ``limit`` steps in order, stopping after the first request, once a batch is full,
        a request waits or ``timeout`` passed."""
        self._ready.wait(timeout)
        sources: list[StepSource] = []
        controls: list[_Control] = []
        with self._lock:
            self._ready.clear()
            while self._items and len(sources) < limit:
                item = self._items.popleft()
                if isinstance(item, _Control):
                    controls.append(item)
                    break
                sources.append(item)
                self._steps -= 1
            if self._steps >= self._batch or any(isinstance(item, _Control) for item in self._items):
                self._ready.set()
        return sources, controls


class _Control:
    """A flush or close request travelling through the queue behind the steps before it."""

    def __init__(self, status: protocol.RunStatus | None = None) -> None:
        self.status = status  # None: flush; "finished" | "crashed": close
        self.done = threading.Event()


def _classify(status: int) -> str:
    """'ok' (acknowledged), 'retry' (try again later) or 'rejected' (the collector refuses it)."""
    if 200 <= status < 300:
        return "ok"
    if status == 429 or status >= 500:
        return "retry"
    return "rejected"


def document_path(kind: str, document: Mapping[str, Any]) -> str:
    """Where a protocol document is posted: run documents register, batches go under their run."""
    if kind == "run":
        return protocol.RUNS_PATH
    return protocol.run_path(document["run"]) + "/batches"


def post_document(
    url: str, token: str | None, path: str, document: Mapping[str, Any], timeout: float
) -> tuple[str, str]:
    """POST one document to the collector at ``url``: ('ok' | 'retry' | 'rejected', detail);
    the detail of an accepted document is the collector's answer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + path, data=protocol.dumps(document), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return _classify(response.status), response.read(2000).decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return _classify(error.code), f"{error.code} {error.read(2000).decode('utf-8', 'replace')}"
    except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
        return "retry", f"unreachable: {error}"


def renamed_run(document: Mapping[str, Any], answer: str) -> str | None:
    """The name the collector stored a registered run under, when it is not the name asked for
    (the name belonged to another process)."""
    try:
        registered = json.loads(answer)
    except ValueError:
        return None
    if isinstance(registered, dict) and registered.get("renamed"):
        name = registered.get("run")
        log.warning(
            "numwatch: run name %r is taken by another process; this process's data is stored as run %r "
            "(watch(..., resume=True) adds to the existing run instead)",
            document.get("run"),
            name,
        )
        return str(name)
    return None


class Transport:
    """Batches step documents to a collector (or the spool) on a background thread."""

    def __init__(
        self,
        run_document: Mapping[str, Any],
        *,
        url: str | None,
        token: str | None,
        spool_dir: str | Path,
        batch_steps: int | None = None,
        batch_seconds: float | None = None,
        queue_steps: int | None = None,
        http_timeout: float | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        # Unset options take the module's constants when the transport is made (tests shrink them).
        batch_steps = batch_steps or BATCH_STEPS
        batch_seconds = batch_seconds or BATCH_SECONDS
        queue_steps = queue_steps or QUEUE_STEPS
        http_timeout = http_timeout or HTTP_TIMEOUT_SECONDS
        retry_seconds = retry_seconds or RETRY_SECONDS
        self.run_document = dict(run_document)
        self.run = run_document["run"]
        self.stored_as = self.run  # the collector's name for it, once registered (another process may hold ``run``)
        self.rank = run_document["rank"]
        self.url = url.rstrip("/") if url else None
        self.token = token
        self.spool_dir = Path(spool_dir)
        self.batch_steps = batch_steps
        self.batch_seconds = batch_seconds
        self.http_timeout = http_timeout
        self.retry_seconds = retry_seconds
        # Counters (read by the watcher; written by one thread each, or under _count_lock).
        self.sent_batches = 0
        self.spooled_batches = 0
        self.rejected_documents = 0
        self.dropped_steps = 0
        self._count_lock = threading.Lock()
        self._reported_dropped = 0
        self._inbox = _Inbox(queue_steps, batch_steps)
        self._spool: SpoolWriter | None = None
        self._spool_lock = threading.Lock()
        self._run_acknowledged = False
        self._spool_pending = False  # set from disk when the sender starts (leftovers of an earlier process)
        self._spooled_documents = 0  # bumped by every append, so a drain racing an append keeps it pending
        self._next_retry = 0.0
        self._retry_delay = retry_seconds
        self._closed = False
        self._thread = threading.Thread(
            target=self._run_sender, name=f"numwatch-sender-{self.run}-{self.rank}", daemon=True
        )
        self._thread.start()

    @property
    def queued_steps(self) -> int:
        """Steps waiting in memory for the sender (at most ``queue_steps``; beyond, they spool)."""
        return self._inbox.steps

    # -- training thread -------------------------------------------------------------

    def submit(self, source: StepSource) -> None:
        """Queue a step without blocking; a full queue sends it to the spool instead."""
        if self._closed:
            return
        if not self._inbox.put_step(source):
            self._spool_overflow(source)

    def flush(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> bool:
        """Send (or spool) everything submitted so far; False if it did not finish in time."""
        return self._request(_Control(), timeout)

    def close(self, status: protocol.RunStatus = "finished", timeout: float = CLOSE_TIMEOUT_SECONDS) -> bool:
        """Send the final batch with ``status`` and stop the sender; idempotent."""
        if self._closed:
            return True
        finished = self._request(_Control(status), timeout)
        self._closed = True
        self._thread.join(timeout=max(0.0, timeout))
        return finished

    def _request(self, control: _Control, timeout: float) -> bool:
        if self._closed or not self._thread.is_alive():
            return False
        self._inbox.put_request(control)
        return control.done.wait(timeout)

    def _spool_overflow(self, source: StepSource) -> None:
        try:
            documents = source.build()
            self._spool_batch(self._batch_document([documents], "running"))
        except Exception as error:  # a full queue and an unwritable spool: count, never raise
            self._count_dropped(1, f"the sender queue is full and the spool failed: {error!r}")

    def _count_dropped(self, steps: int, reason: str) -> None:
        with self._count_lock:
            first = self.dropped_steps == 0
            self.dropped_steps += steps
        if first:
            log.error(
                "numwatch: lost %d step(s) of monitoring data for run %r (%s); training goes on. "
                "Lost steps are counted in Watcher.dropped_steps and reported to the collector "
                "as a monitoring_dropped event. Check the spool %s.",
                steps,
                self.run,
                reason,
                self.spool_dir,
            )

    # -- sender thread ---------------------------------------------------------------

    def _run_sender(self) -> None:
        self._spool_pending = self._spool_pending or self._has_pending_spool()
        closing: _Control | None = None
        while closing is None:
            sources, controls = self._collect()
            closing = next((c for c in controls if c.status is not None), None)
            try:
                if sources or closing is not None:
                    status = closing.status if closing is not None and closing.status is not None else "running"
                    self._deliver_steps(sources, status)
                elif self._spool_pending and self.url and time.monotonic() >= self._next_retry:
                    self._drain_spool()
            except Exception as error:  # typically the spool: disk full, directory not writable
                self._count_dropped(len(sources), f"neither sent nor spooled: {error!r}")
            if controls:
                self._sync_spool(close=closing is not None)
            for control in controls:
                control.done.set()
        if self._spool_pending:
            log.warning(
                "numwatch: unsent data for run %r rank %d is in %s; upload it with `numwatch sync`",
                self.run,
                self.rank,
                self.spool_dir,
            )

    def _collect(self) -> tuple[list[StepSource], list[_Control]]:
        """Wait for steps: up to ``batch_steps`` of them, at most ``batch_seconds``, or until a
        flush/close request arrives."""
        return self._inbox.take(self.batch_steps, self.batch_seconds)

    def _deliver_steps(self, sources: list[StepSource], status: protocol.RunStatus) -> None:
        documents = []
        for source in sources:
            try:
                documents.append(source.build())
            except Exception as error:
                self._count_dropped(
                    1, f"could not build the documents of step {getattr(source, 'step_number', '?')}: {error!r}"
                )
        self._deliver(self._batch_document(documents, status))

    def _batch_document(self, documents: list[StepDocuments], status: protocol.RunStatus) -> protocol.BatchDocument:
        events = [event for d in documents for event in d.events]
        events.extend(self._dropped_event(documents))
        return protocol.batch_document(
            self.run,
            rank=self.rank,
            instance=self.run_document.get("instance"),
            steps=[d.step for d in documents],
            histograms=[h for d in documents for h in d.histograms],
            events=events,
            status=status,
        )

    def _dropped_event(self, documents: list[StepDocuments]) -> list[protocol.EventDocument]:
        """A ``monitoring_dropped`` event when steps were dropped since the last report."""
        with self._count_lock:
            dropped = self.dropped_steps
            if dropped == self._reported_dropped:
                return []
            newly = dropped - self._reported_dropped
            self._reported_dropped = dropped
        step = documents[-1].step["step"] if documents else 0
        return [
            protocol.event_document(step, "monitoring_dropped", {"dropped_steps": dropped, "since_last_report": newly})
        ]

    def _deliver(self, batch: protocol.BatchDocument) -> None:
        if self.url is None:
            self._spool_batch(batch)
            return
        if self._spool_pending:
            self._drain_spool(force=batch["status"] != "running")
        if self._spool_pending:
            self._spool_batch(batch)
            return
        if not self._run_acknowledged and not self._post_run():
            self._spool_batch(batch)
            return
        outcome, _ = self._post(document_path("batch", batch), batch)
        if outcome == "ok":
            self.sent_batches += 1
        elif outcome == "retry":
            self._spool_batch(batch)

    def _post_run(self) -> bool:
        """Register the run; True when the collector acknowledged (or refused) it for good."""
        outcome, answer = self._post(document_path("run", self.run_document), self.run_document)
        if outcome == "retry":
            return False
        if outcome == "ok":
            self.stored_as = renamed_run(self.run_document, answer) or self.run
        self._run_acknowledged = True
        return True

    def _ensure_spool(self) -> SpoolWriter:
        with self._spool_lock:
            if self._spool is None:
                self._spool = SpoolWriter(self.spool_dir)
                # The spool is self-contained: its run document comes first (a collector
                # registers a run idempotently, so a repeat is harmless).
                self._spool.append("run", self.run_document)
            return self._spool

    def open_spool(self) -> None:
        """Create the spool now (spool-only runs), so the run document is on disk at once."""
        self._ensure_spool()

    def _spool_batch(self, batch: protocol.BatchDocument) -> None:
        spool = self._ensure_spool()
        spool.append("batch", batch)
        with self._count_lock:
            self.spooled_batches += 1
            self._spooled_documents += 1
            if self.url:
                self._spool_pending = True

    def _sync_spool(self, close: bool) -> None:
        """fsync (and close) the spool, if one is open; a failure is logged, never raised."""
        if self._spool is None:
            return
        try:
            with self._spool_lock:
                self._spool.close() if close else self._spool.flush()
        except OSError:
            log.warning("numwatch: could not fsync the spool %s", self.spool_dir, exc_info=True)

    def _has_pending_spool(self) -> bool:
        if not self.url or not self.spool_dir.is_dir():
            return False
        return next(read_entries(self.spool_dir, read_uploaded_mark(self.spool_dir)), None) is not None

    def _drain_spool(self, force: bool = False) -> None:
        """Upload spooled documents in order, marking each as uploaded once acknowledged;
        stops at the first that must be retried (and backs off)."""
        if not force and time.monotonic() < self._next_retry:
            return
        with self._count_lock:
            spooled_before = self._spooled_documents
        for entry in read_entries(self.spool_dir, read_uploaded_mark(self.spool_dir)):
            outcome, answer = self._post(document_path(entry.kind, entry.body), entry.body)
            if entry.kind == "run" and outcome == "ok":
                self.stored_as = renamed_run(entry.body, answer) or self.run
            if outcome == "retry":
                self._next_retry = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_SECONDS)
                return
            if entry.kind == "run":
                self._run_acknowledged = True
            elif outcome == "ok":
                self.sent_batches += 1
            mark_uploaded(self.spool_dir, entry.end)
        with self._count_lock:
            # A step spooled by the training thread (full queue) while this read ran stays pending.
            self._spool_pending = self._spooled_documents != spooled_before
        self._retry_delay = self.retry_seconds
        discard_uploaded_segments(self.spool_dir)
        log.info("numwatch: spool %s drained to %s", self.spool_dir, self.url)

    def _post(self, path: str, document: Mapping[str, Any]) -> tuple[str, str]:
        """POST one document; ('ok' | 'retry' | 'rejected' (logged and counted), detail)."""
        assert self.url is not None
        outcome, detail = post_document(self.url, self.token, path, document, self.http_timeout)
        if outcome == "rejected":
            self.rejected_documents += 1
            log.error("numwatch: collector %s rejected %s: %s", self.url, path, detail)
        elif outcome == "retry":
            log.debug("numwatch: collector %s asked to retry %s: %s", self.url, path, detail)
        return outcome, detail
