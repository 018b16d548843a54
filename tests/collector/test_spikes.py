"""Loss and gradient-norm spike detectors and the rolling spike score.

The collector tests post a decaying, noisy loss curve (healthy) with spikes planted at known
steps to two real collector replicas on one database, alternating batches between them,
and check that the events come at exactly the planted steps, with window statistics equal
to a float64 reference computed here, and that /metrics reports the spike score of the
steps as sent.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from numwatch import protocol
from numwatch.monitor.detectors import spikes
from numwatch.monitor.detectors.rules import DetectorConfig
from tests.support.collector_docs import batch_doc, run_doc, step_doc

SIGMAS, WINDOW, SCORE_STEPS = 6.0, 128, 300
STEPS = 1000
GRAD_SPIKES = {400: 10.0, 850: 8.0}  # step -> factor on the global norm
LOSS_SPIKES = {403: 1.0, 700: 1.0, 701: 1.0}  # step -> added to the loss; 700-701 is one episode
NAN_LOSS_STEP = 500
# Batch boundaries: the 700-701 episode straddles two batches (and two replicas).
BOUNDARIES = [1, 37, 101, 128, 129, 130, 300, 401, 404, 560, 701, 702, 999, STEPS + 1]


def healthy_curve(seed: int = 7) -> tuple[list[float], list[float]]:
    """A decaying loss with minibatch noise and a noisy global norm, steps 1..STEPS."""
    rng = random.Random(seed)
    losses = [2.0 + 3.0 * math.exp(-step / 250.0) + rng.gauss(0.0, 0.05) for step in range(1, STEPS + 1)]
    norms = [0.8 + 0.5 * math.exp(-step / 100.0) + abs(rng.gauss(0.0, 0.05)) for step in range(1, STEPS + 1)]
    return losses, norms


def planted_curve() -> tuple[list[float], list[float]]:
    losses, norms = healthy_curve()
    for step, added in LOSS_SPIKES.items():
        losses[step - 1] += added
    for step, factor in GRAD_SPIKES.items():
        norms[step - 1] *= factor
    losses[NAN_LOSS_STEP - 1] = math.nan
    return losses, norms


def reference_window(values: list[float], step: int) -> tuple[float, float]:
    """Mean and population σ of the WINDOW finite values before ``step`` (1-based)."""
    finite = [v for v in values[: step - 1] if math.isfinite(v)][-WINDOW:]
    assert len(finite) == WINDOW
    return statistics.fmean(finite), statistics.pstdev(finite)


def reference_spikes(values: list[float]) -> list[int]:
    """Every judged step whose value exceeds mean + k·σ of its window (not only episode starts)."""
    out = []
    for step in range(1, len(values) + 1):
        value = values[step - 1]
        if not math.isfinite(value) or sum(math.isfinite(v) for v in values[: step - 1]) < WINDOW:
            continue
        mean, std = reference_window(values, step)
        if value > mean + SIGMAS * std:
            out.append(step)
    return out


def test_judge_matches_the_reference_on_every_judged_value() -> None:
    losses, _ = planted_curve()
    judged = spikes.judge(list(enumerate(losses, start=1)), SIGMAS, WINDOW)
    finite_steps = [s for s, v in enumerate(losses, start=1) if math.isfinite(v)]
    assert [j.step for j in judged] == finite_steps[WINDOW:]
    for judgement in judged[::37]:
        mean, std = reference_window(losses, judgement.step)
        assert judgement.mean == pytest.approx(mean, rel=1e-12) and judgement.std == pytest.approx(std, rel=1e-12)
    assert [j.step for j in judged if j.spike] == reference_spikes(losses) == sorted(LOSS_SPIKES)


def test_healthy_decaying_noisy_curves_have_no_spike() -> None:
    for seed in range(5):
        losses, norms = healthy_curve(seed)
        assert reference_spikes(losses) == [] and reference_spikes(norms) == []
        for values in (losses, norms):
            assert not any(j.spike for j in spikes.judge(list(enumerate(values, start=1)), SIGMAS, WINDOW))


def test_score_state_stays_bounded_and_counts_the_last_n_judged_values() -> None:
    rng = random.Random(3)
    flags = [rng.random() < 0.02 or 5000 <= i < 5400 for i in range(30_000)]  # scattered spikes and one long episode
    state: dict = {}
    for start in range(0, len(flags), 777):
        fresh = [
            spikes.Judgement(i, 0.0, 0.0, 0.0, 0.0, flag) for i, flag in enumerate(flags[start : start + 777], start)
        ]
        state = spikes.advance_score(state, {"loss": fresh}, 10_000)
        judged = min(start + 777, len(flags))
        expected = sum(flags[max(0, judged - 10_000) : judged]) / min(judged, 10_000)
        assert spikes.score(state["loss"], 10_000) == pytest.approx(expected, rel=1e-12)
        assert all(first > judged - 10_000 for first, _ in state["loss"]["episodes"])
    assert len(state["loss"]["episodes"]) < 400  # bounded by the last 10,000 values, not the run


def _metric_samples(client: httpx.Client, name: str, run: str) -> dict[str, float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {
        sample.labels["signal"]: sample.value
        for family in families
        if family.name == name
        for sample in family.samples
        if sample.labels.get("run") == run
    }


def test_spikes_fire_at_the_planted_steps_through_two_replicas(collector, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'spikes.db'}"
    env = {"NUMWATCH_DETECT_SPIKE_SCORE_STEPS": str(SCORE_STEPS)}
    urls = [collector(database_url, **env), collector(database_url, **env)]
    losses, norms = planted_curve()
    base = np.array([0.5, 0.25, 0.125])
    with httpx.Client(base_url=urls[0], timeout=30) as a, httpx.Client(base_url=urls[1], timeout=30) as b:
        assert a.post("/api/v1/runs", json=run_doc()).status_code == 200
        for index, (start, stop) in enumerate(itertools.pairwise(BOUNDARIES)):
            steps = [
                step_doc(step, norms=list(base * norms[step - 1] / np.linalg.norm(base)), loss=losses[step - 1])
                for step in range(start, stop)
            ]
            client = (a, b)[index % 2]
            response = client.post(
                "/api/v1/runs/r1/batches",
                content=protocol.dumps(batch_doc(steps=steps)),
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 200, response.text
        events = a.get("/api/v1/runs/r1/events").json()
        loss_events = [e for e in events if e["kind"] == "loss_spike"]
        grad_events = [e for e in events if e["kind"] == "grad_norm_spike"]
        assert [e["step"] for e in loss_events] == [403, 700]
        assert [e["step"] for e in grad_events] == sorted(GRAD_SPIKES)
        for event in loss_events:
            mean, std = reference_window(losses, event["step"])
            details = event["details"]
            assert details["window_mean"] == pytest.approx(mean, rel=1e-12)
            assert details["window_std"] == pytest.approx(std, rel=1e-12)
            assert details["threshold"] == pytest.approx(mean + SIGMAS * std, rel=1e-12)
            assert details["loss"] == pytest.approx(losses[event["step"] - 1], rel=1e-15)
            assert (details["sigmas"], details["window"]) == (SIGMAS, WINDOW)
        assert loss_events[0]["details"]["grad_norm_spike_steps_earlier"] == 3
        assert loss_events[0]["details"]["note"] == "grad norm spiked 3 steps earlier"
        assert loss_events[1]["details"]["grad_norm_spike_step"] is None  # the last grad spike (400) is 300 steps back
        assert grad_events[0]["details"]["window_mean"] == pytest.approx(reference_window(norms, 400)[0], rel=1e-12)

        # The score: spike values among the last SCORE_STEPS judged values, on both replicas.
        def expected_score(values: list[float]) -> float:
            judged = [
                s
                for s in range(1, STEPS + 1)
                if math.isfinite(values[s - 1]) and sum(math.isfinite(v) for v in values[: s - 1]) >= WINDOW
            ]
            recent = set(judged[-SCORE_STEPS:])
            return len(recent & set(reference_spikes(values))) / SCORE_STEPS

        expected = {"loss": expected_score(losses), "grad_norm": expected_score(norms)}
        assert expected == {
            "loss": 1 / SCORE_STEPS,
            "grad_norm": 1 / SCORE_STEPS,
        }  # 701 and 850 are in the window; 700 is not
        for client in (a, b):
            assert _metric_samples(client, "numwatch_spike_score", "r1") == pytest.approx(expected, rel=1e-12)


def test_detect_without_enough_history_judges_nothing() -> None:
    config = DetectorConfig()
    views = [
        {"step": s, "time": 0.0, "loss": 1.0 if s < 100 else 100.0, "global_grad_norm": None} for s in range(1, 129)
    ]
    events, fresh = spikes.detect({"loss": [], "grad_norm": []}, views, config)
    assert events == [] and fresh == {"loss": [], "grad_norm": []}
