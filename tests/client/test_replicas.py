"""Two collector replicas on one PostgreSQL: a run's batches split between them lose and
duplicate nothing, and both replicas' /metrics report the run exactly as it was sent.

The batches go alternately to replica A and B, one is retried on the other replica, and the
rest are posted by two threads at once (every batch to both replicas, in opposite orders),
so the replicas race on the same (run, rank) rows. The expected numbers are computed here
from the documents themselves (numpy float64), not read back from either replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from numwatch import protocol
from numwatch.monitor.settings import Settings
from numwatch.monitor.store.models import GRAD_NORM_BUCKETS
from tests.support.collector_docs import batch_doc, run_doc, step_doc

RUN = "replicated"
STEPS_PER_BATCH = 4
BATCHES = 24
LAST_STEP = STEPS_PER_BATCH * BATCHES
ALTERNATING_BATCHES = 8  # batches 0..7 alternate A, B; batch 8 goes to A and is retried on B
POST_ATTEMPTS = 5  # a replica may answer 503 when it loses a commit race too often; clients retry
JSON = {"Content-Type": "application/json"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass(frozen=True)
class StepPlan:
    """What step ``number`` reports, chosen so every counter of the run is exercised."""

    number: int
    norms: tuple[float, float, float]
    loss: float
    skipped: bool
    decision: str
    new_loss_scale: float

    @classmethod
    def for_step(cls, number: int) -> StepPlan:
        skipped = number % 10 == 5  # an overflow the GradScaler absorbed: skipped, scale backed off
        nonfinite = number % 17 == 0  # a non-finite gradient that reached the optimizer
        first = 10.0 ** ((number % 9) - 4)  # spread over the histogram's decades
        norms = (math.inf if skipped else first, math.nan if nonfinite else 0.25, 0.125)
        decision = "backoff" if skipped else ("growth" if number % 8 == 0 else "none")
        return cls(
            number,
            norms,
            math.nan if number % 13 == 0 else 1.0 / number,
            skipped,
            decision,
            512.0 if skipped else 1024.0,
        )

    @property
    def global_norm(self) -> float:
        return float(np.sqrt(np.sum(np.square(np.asarray(self.norms, dtype=np.float64)))))

    def document(self) -> dict:
        return step_doc(
            self.number,
            norms=list(self.norms),
            loss=self.loss,
            skipped=self.skipped,
            scale_decision=self.decision,
            new_loss_scale=self.new_loss_scale,
        )


PLANS = [StepPlan.for_step(n) for n in range(1, LAST_STEP + 1)]


@cache
def batch_body(index: int) -> bytes:
    """Batch ``index`` (steps 4*index+1 .. 4*index+4); built once, so a retry sends the same bytes."""
    steps = [plan.document() for plan in PLANS[index * STEPS_PER_BATCH : (index + 1) * STEPS_PER_BATCH]]
    return protocol.dumps(batch_doc(run=RUN, steps=steps, batch_id=f"batch-{index}"))


def post_batch(client: httpx.Client, body: bytes) -> dict:
    """POST a batch until it is acknowledged (a real client retries 503); the collector's answer."""
    for _ in range(POST_ATTEMPTS):
        response = client.post(f"/api/v1/runs/{RUN}/batches", content=body, headers=JSON)
        if response.status_code != 503:
            response.raise_for_status()
            return response.json()
        time.sleep(0.05)
    raise AssertionError(f"batch still refused after {POST_ATTEMPTS} attempts: {response.text}")


def run_samples(client: httpx.Client) -> Samples:
    """The run's samples on this replica's /metrics, parsed by prometheus_client."""
    response = client.get("/metrics")
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.labels.get("run") == RUN
    }


def ingest_steps(client: httpx.Client) -> float:
    """This replica process's own count of the steps it stored (numwatch_ingest_steps_total)."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == "numwatch_ingest_steps_total")


def same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def assert_same_samples(left: Samples, right: Samples) -> None:
    assert left.keys() == right.keys(), f"series only on one replica: {sorted(left.keys() ^ right.keys(), key=str)}"
    differing = {key: (left[key], right[key]) for key in left if not same_value(left[key], right[key])}
    assert not differing, f"replicas disagree: {differing}"


def max_without_instance(*replicas: Samples) -> Samples:
    """``max without(instance) (...)`` over the replicas' samples (NaN loses to a number, as in PromQL)."""
    merged: Samples = {}
    for samples in replicas:
        for key, value in samples.items():
            merged[key] = value if key not in merged or math.isnan(merged[key]) else max(merged[key], value)
    return merged


def expected_samples(plans: list[StepPlan]) -> Samples:
    """The run's counters, last values and norm histogram, computed from the documents sent."""
    labels = frozenset({"run": RUN, "rank": "0"}.items())
    last = max(plans, key=lambda plan: plan.number)
    norms = np.array([plan.global_norm for plan in plans], dtype=np.float64)
    finite = norms[np.isfinite(norms)]
    expected = {
        ("numwatch_steps_total", labels): len(plans),
        ("numwatch_skipped_steps_total", labels): sum(plan.skipped for plan in plans),
        ("numwatch_nonfinite_steps_total", labels): sum(
            not plan.skipped and not all(map(math.isfinite, plan.norms)) for plan in plans
        ),
        ("numwatch_nonfinite_loss_total", labels): sum(math.isnan(plan.loss) for plan in plans),
        ("numwatch_loss_scale_backoffs_total", labels): sum(plan.decision == "backoff" for plan in plans),
        ("numwatch_loss_scale_growths_total", labels): sum(plan.decision == "growth" for plan in plans),
        ("numwatch_run_last_step", labels): last.number,
        ("numwatch_loss", labels): last.loss,
        ("numwatch_loss_scale", labels): last.new_loss_scale,
        ("numwatch_global_grad_norm", labels): last.global_norm,
        ("numwatch_layers_nonfinite", labels): sum(not math.isfinite(norm) for norm in last.norms),
        ("numwatch_global_grad_norm_distribution_count", labels): len(plans),
        ("numwatch_global_grad_norm_distribution_sum", labels): float(finite.sum()),
        (
            "numwatch_run_info",
            frozenset(
                {"run": RUN, "project": "default", "format": "fp16", "world_size": "1", "status": "running"}.items()
            ),
        ): 1,
    }
    for bound in GRAD_NORM_BUCKETS:
        expected[("numwatch_global_grad_norm_distribution_bucket", labels | {("le", repr(bound))})] = int(
            (finite <= bound).sum()
        )
    expected[("numwatch_global_grad_norm_distribution_bucket", labels | {("le", "+Inf")})] = len(plans)
    return {key: float(value) for key, value in expected.items()}


def assert_reports(samples: Samples, plans: list[StepPlan]) -> None:
    expected = expected_samples(plans)
    wrong = {
        key: (samples.get(key), value)
        for key, value in expected.items()
        if key not in samples
        or not (math.isclose(samples[key], value, rel_tol=1e-12) or same_value(samples[key], value))
    }
    assert not wrong, f"(reported, sent) differ: {wrong}"


def stored_steps(client: httpx.Client) -> list[int]:
    response = client.get(f"/api/v1/runs/{RUN}/series", params={"metric": "step_time", "max_points": 100_000})
    response.raise_for_status()
    return response.json()["steps"]


def post_concurrently(clients: tuple[httpx.Client, httpx.Client], batches: list[int]) -> list[dict]:
    """Every batch of ``batches`` to both replicas at once: A in ascending, B in descending order."""
    answers: list[list[dict]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def poster(side: int) -> None:
        try:
            start.wait(timeout=30)
            for index in batches if side == 0 else batches[::-1]:
                answers[side].append(post_batch(clients[side], batch_body(index)))
        except BaseException as error:  # noqa: BLE001 (re-raised on the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=poster, args=(side,)) for side in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads), "posting threads did not finish"
    return answers[0] + answers[1]


def wait_past_metrics_cache() -> None:
    """/metrics renders are cached per process for metrics_cache_seconds (default) by design."""
    time.sleep(Settings.model_fields["metrics_cache_seconds"].default + 0.2)


def test_two_replicas_on_one_postgres_agree_and_store_every_step_once(
    collector: Callable[..., str], postgres_url: str
) -> None:
    urls = (collector(postgres_url), collector(postgres_url))
    with httpx.Client(base_url=urls[0], timeout=60) as a, httpx.Client(base_url=urls[1], timeout=60) as b:
        clients = (a, b)
        for client in clients:  # the hooks register once per rank; a second registration is a no-op
            client.post("/api/v1/runs", json=run_doc(run=RUN)).raise_for_status()

        answers = [post_batch(clients[i % 2], batch_body(i)) for i in range(ALTERNATING_BATCHES)]
        answers.append(post_batch(a, batch_body(ALTERNATING_BATCHES)))
        retried = post_batch(b, batch_body(ALTERNATING_BATCHES))
        assert (retried["stored_steps"], retried["duplicate_steps"], retried["conflicting_steps"]) == (
            0,
            STEPS_PER_BATCH,
            0,
        )

        # Both replicas render (and cache) /metrics now, mid-run; the later writes must show anyway.
        wait_past_metrics_cache()
        halfway = [run_samples(client) for client in clients]
        assert_same_samples(*halfway)
        assert_reports(halfway[0], PLANS[: (ALTERNATING_BATCHES + 1) * STEPS_PER_BATCH])

        answers += post_concurrently(clients, list(range(ALTERNATING_BATCHES + 1, BATCHES)))
        # Acknowledgements: each step stored by exactly one request, every other copy a duplicate.
        assert sum(answer["stored_steps"] for answer in answers) == LAST_STEP
        assert sum(answer["conflicting_steps"] for answer in answers) == 0

        expected_steps = list(range(1, LAST_STEP + 1))
        assert stored_steps(a) == stored_steps(b) == expected_steps
        summaries = [client.get(f"/api/v1/runs/{RUN}").json() for client in clients]
        assert [(s["steps_total"], s["last_step"]) for s in summaries] == [(LAST_STEP, LAST_STEP)] * 2

        wait_past_metrics_cache()
        final = [run_samples(client) for client in clients]
        assert_same_samples(*final)
        assert_reports(final[0], PLANS)
        # What the alert rules compute, max without(instance), is the truth and double-counts nothing.
        assert_same_samples(max_without_instance(*final), final[0])
        assert_reports(max_without_instance(*final), PLANS)
        # Per-process ingest counters are per replica by design; summed, each step counts once.
        assert ingest_steps(a) + ingest_steps(b) == LAST_STEP


def test_concurrent_batches_on_one_collector_keep_every_count(collector: Callable[..., str], database_url: str) -> None:
    """The same race inside one process (a client's retry while its first attempt is in flight),
    on SQLite too, where two request threads share the database write lock."""
    url = collector(database_url)
    with httpx.Client(base_url=url, timeout=60) as first, httpx.Client(base_url=url, timeout=60) as second:
        first.post("/api/v1/runs", json=run_doc(run=RUN)).raise_for_status()
        answers = post_concurrently((first, second), list(range(BATCHES)))
        assert sum(answer["stored_steps"] for answer in answers) == LAST_STEP
        assert stored_steps(first) == list(range(1, LAST_STEP + 1))
        wait_past_metrics_cache()
        assert_reports(run_samples(first), PLANS)
