"""One client process of the load benchmark (``load.py``): registers its own run, then streams
batches to the collector as fast as it answers until the time is up, and reports what was
acknowledged.

Per-tensor payloads come from a small pool built before the clock starts, so the clients
(which share the machine's cores with the collector) spend their time on HTTP and JSON,
not on random numbers; step numbers, times and cadences are those of a real run.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from benchmarks.documents import histogram_document, run_document, sampled, step_document, values_in
from numwatch import protocol

POOL_SIZE = 8  # distinct per-step payloads per client
RETRY_PAUSE_S = 0.1
REQUEST_TIMEOUT_S = 120.0
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class ClientPlan:
    """What one client sends (picklable: it crosses to a spawned process)."""

    url: str
    run: str
    seed: int
    seconds: float
    n_tensors: int
    steps_per_batch: int
    format_every: int
    histogram_every: int


@dataclass
class ClientReport:
    """What one client saw: acknowledged steps, latencies of acknowledged batches, errors by kind."""

    run: str
    acknowledged_steps: int = 0
    batches_ok: int = 0
    values: int = 0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    # Steps of a batch whose last attempt got no answer when time ran out: stored or not.
    in_doubt_steps: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0


class BatchStream:
    """Consecutive batches of one run, from a pool of pre-encoded per-step payloads."""

    def __init__(self, plan: ClientPlan) -> None:
        rng = np.random.default_rng(plan.seed)
        self.plan = plan
        # Step 1 of the pool has format counts, step 2 has none (see documents.sampled).
        self.with_counts = [step_document(1, plan.n_tensors, rng, True) for _ in range(POOL_SIZE)]
        self.plain = [step_document(2, plan.n_tensors, rng, False) for _ in range(POOL_SIZE)]
        self.histograms = [histogram_document(1, kind, plan.n_tensors, rng) for kind in protocol.HISTOGRAM_KINDS]

    def batch(self, first_step: int) -> dict[str, Any]:
        """Steps ``first_step ..`` of the run, with format counts and histograms at the hooks' cadences."""
        plan, now = self.plan, time.time()
        numbers = range(first_step, first_step + plan.steps_per_batch)
        steps = [
            {
                **(self.with_counts if sampled(s, plan.format_every) else self.plain)[s % POOL_SIZE],
                "step": s,
                "time": now,
            }
            for s in numbers
        ]
        histograms = [{**h, "step": s} for s in numbers if sampled(s, plan.histogram_every) for h in self.histograms]
        return dict(
            protocol.batch_document(plan.run, batch_id=f"{plan.run}-{first_step}", steps=steps, histograms=histograms)
        )


def _register(client: httpx.Client, plan: ClientPlan, deadline: float) -> None:
    while True:
        try:
            client.post("/api/v1/runs", json=run_document(plan.run, plan.n_tensors)).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(RETRY_PAUSE_S)


def run_client(plan: ClientPlan, ready: Any, progress: Any, results: Any) -> None:
    """Process entry point: register, wait at ``ready`` (a Barrier), stream for ``plan.seconds``,
    put a :class:`ClientReport` on ``results``. ``progress`` (a shared int) counts acknowledged batches."""
    stream = BatchStream(plan)
    report = ClientReport(plan.run)
    with httpx.Client(base_url=plan.url, timeout=REQUEST_TIMEOUT_S) as client:
        _register(client, plan, time.monotonic() + 60)
        ready.wait()
        report.started_at = time.time()
        deadline = time.monotonic() + plan.seconds
        next_step = 1
        while time.monotonic() < deadline:
            batch = stream.batch(next_step)
            body = protocol.dumps(batch)
            started = time.perf_counter()
            try:
                response = client.post(f"/api/v1/runs/{plan.run}/batches", content=body, headers=JSON)
                outcome: str | int = response.status_code
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            elapsed = time.perf_counter() - started
            if outcome == 200:
                report.latencies_s.append(elapsed)
                report.batches_ok += 1
                report.acknowledged_steps += plan.steps_per_batch
                report.values += values_in(batch, plan.n_tensors)
                next_step += plan.steps_per_batch
                with progress.get_lock():
                    progress.value += 1
                report.in_doubt_steps = 0
            else:
                report.errors[str(outcome)] += 1
                # No answer means the batch may have been committed; an HTTP error means it was not.
                report.in_doubt_steps = plan.steps_per_batch if isinstance(outcome, str) else 0
                time.sleep(RETRY_PAUSE_S)  # then the same steps again, as the hooks' sender does
        report.finished_at = time.time()
    results.put(report)
