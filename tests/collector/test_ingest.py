"""The write API over real HTTP to a real collector process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from numwatch import protocol
from tests.support.collector_docs import NUMEL, TENSORS, array, batch_doc, post_batch, run_doc, step_doc


def test_round_trip_keeps_values_nan_and_inf_exactly(api: httpx.Client) -> None:
    steps = [
        step_doc(1),
        step_doc(2, norms=[0.5, float("nan"), float("inf")], loss=float("nan"), headroom_bits="-Infinity"),
    ]
    response = post_batch(api, batch_doc(steps=steps))
    assert response.status_code == 200, response.text
    assert response.json()["stored_steps"] == 2
    record = api.get("/api/v1/runs/r1/steps/2").json()
    assert record["loss"] == "NaN" and record["headroom_bits"] == "-Infinity"
    assert record["tensors"]["embed.weight"]["grad_norm"] == 0.5
    assert record["tensors"]["head.weight"]["grad_norm"] == "NaN"
    assert record["tensors"]["head.bias"]["grad_norm"] == "Infinity"
    assert record["tensors"]["head.weight"]["nan_count"] == 3
    series = api.get("/api/v1/runs/r1/series", params={"metric": "grad_norm", "tensor": "head.bias"}).json()
    assert series == {"steps": [1, 2], "values": [0.125, "Infinity"]}
    kinds = {e["kind"]: e for e in api.get("/api/v1/runs/r1/events").json()}
    assert kinds["nonfinite_grad"]["step"] == 2
    assert [t["name"] for t in kinds["nonfinite_grad"]["details"]["tensors"]] == ["head.weight", "head.bias"]
    assert kinds["nonfinite_loss"]["step"] == 2


def test_retried_batch_stores_nothing_twice_and_conflicts_are_recorded(api: httpx.Client) -> None:
    batch = batch_doc(steps=[step_doc(s) for s in range(1, 6)])
    assert post_batch(api, batch).json()["stored_steps"] == 5
    again = post_batch(api, batch).json()
    assert again["stored_steps"] == 0 and again["duplicate_steps"] == 5 and again["conflicting_steps"] == 0
    # Step 3 again with other content: the first version wins, the conflict is counted.
    changed = post_batch(api, batch_doc(steps=[step_doc(3, norms=[9.0, 9.0, 9.0]), step_doc(6)])).json()
    assert changed == {"stored_steps": 1, "duplicate_steps": 1, "conflicting_steps": 1, "events": 0}
    assert api.get("/api/v1/runs/r1/steps/3").json()["tensors"]["embed.weight"]["grad_norm"] == 0.5
    summary = api.get("/api/v1/runs/r1").json()
    assert summary["steps_total"] == 6 and summary["last_step"] == 6


def test_a_step_repeated_inside_one_batch_keeps_the_first_copy_and_records_the_conflict(api: httpx.Client) -> None:
    batch = batch_doc(steps=[step_doc(1), step_doc(2), step_doc(2), step_doc(2, norms=[9.0, 9.0, 9.0])])
    assert post_batch(api, batch).json() == {
        "stored_steps": 2,
        "duplicate_steps": 2,
        "conflicting_steps": 1,
        "events": 0,
    }
    assert api.get("/api/v1/runs/r1/steps/2").json()["tensors"]["embed.weight"]["grad_norm"] == 0.5
    assert api.get("/api/v1/runs/r1").json()["steps_total"] == 2


def test_rank_state_counts_only_new_steps(api: httpx.Client) -> None:
    counts = {"zeros": [4, 0, 0], "underflow": [8, 2, 0], "subnormal": [1, 1, 1], "overflow": [0, 0, 0]}
    steps = [
        step_doc(1, scale_decision="growth", new_loss_scale=2048.0),
        step_doc(2, norms=[np.inf, 1.0, 1.0], skipped=True, scale_decision="backoff", new_loss_scale=1024.0),
        step_doc(3, tensors={name: array(v, "<i8") for name, v in counts.items()}),
    ]
    for _ in range(2):
        assert post_batch(api, batch_doc(steps=steps)).status_code == 200
    metrics = api.get("/metrics").text
    assert 'numwatch_steps_total{rank="0",run="r1"} 3.0' in metrics
    assert 'numwatch_skipped_steps_total{rank="0",run="r1"} 1.0' in metrics
    assert 'numwatch_loss_scale_backoffs_total{rank="0",run="r1"} 1.0' in metrics
    assert 'numwatch_loss_scale_growths_total{rank="0",run="r1"} 1.0' in metrics
    # The skipped overflow was absorbed by the scaler: not a non-finite step that reached the optimizer.
    assert 'numwatch_nonfinite_steps_total{rank="0",run="r1"} 0.0' in metrics
    expected_underflow = sum(counts["underflow"]) / sum(NUMEL)
    line = next(x for x in metrics.splitlines() if x.startswith("numwatch_grad_underflow_ratio{"))
    assert 'format="fp16"' in line and math.isclose(float(line.split()[-1]), expected_underflow, rel_tol=1e-12)
    events = api.get("/api/v1/runs/r1").json()["events"]
    assert events == {
        "loss_scale_backoff": 1,
        "loss_scale_growth": 1,
        "nonfinite_grad": 1,
        "skipped_step": 1,
        "underflow_high": 1,
    }


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda b: b["steps"][1]["tensors"].update(grad_norm=array([1.0, 2.0], "<f4")),
            "steps[1].tensors.grad_norm: expected 3 values, got 2",
        ),
        (lambda b: b["steps"][0]["tensors"].update(grad_norm="%%%"), "steps[0].tensors"),
        (lambda b: b["steps"][0].update(step=-4), "steps[0].step"),
        (lambda b: b["steps"][0].update(step=2**70), "steps[0].step"),
        (lambda b: b["steps"][0].update(loss="nan-ish"), "steps[0].loss"),
        (lambda b: b["steps"][0].update(time="NaN"), "steps[0].time"),
        (lambda b: b["steps"][0].update(scale_decision="maybe"), "steps[0].scale_decision"),
        (lambda b: b.update(protocol=5), "protocol"),
        (
            lambda b: (b.update(protocol=3), b["steps"][0].update(local=protocol.local_health(1.0, 0))),
            "steps[0].local: needs protocol 4, the batch says 3",
        ),
        (
            lambda b: b["steps"][0].update(local={**protocol.local_health(1.0, 0), "nonfinite": -1}),
            "steps[0].local.nonfinite",
        ),
        # Version 1 batches stay accepted, but they predate the Adam-health and quantization stats.
        (
            lambda b: (
                b.update(protocol=1),
                b["steps"][1]["tensors"].update(quant_sqnr_nf4=array([20.0, 20.0, np.nan], "<f4")),
            ),
            "steps[1].tensors.quant_sqnr_nf4: needs protocol 2, the batch says 1",
        ),
        (lambda b: b.update(run="other"), "run: the document is for"),
    ],
)
def test_bad_batches_get_422_naming_the_field_and_store_nothing(api: httpx.Client, mutate, field: str) -> None:
    batch = batch_doc(steps=[step_doc(1), step_doc(2)])
    mutate(batch)
    response = post_batch(api, batch)
    assert response.status_code == 422, response.text
    assert field in str(response.json()["detail"])
    assert api.get("/api/v1/runs/r1").json()["steps_total"] == 0


def test_transport_errors_are_4xx_with_reasons(api: httpx.Client) -> None:
    assert (
        api.post(
            "/api/v1/runs/nope/batches",
            content=protocol.dumps(batch_doc(run="nope")),
            headers={"Content-Type": "application/json"},
        ).status_code
        == 404
    )
    assert api.post("/api/v1/runs/r1/batches", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    truncated = api.post(
        "/api/v1/runs/r1/batches",
        content=protocol.dumps(batch_doc(steps=[step_doc(1)]))[:-7],
        headers={"Content-Type": "application/json"},
    )
    assert truncated.status_code == 422 and "not valid JSON" in truncated.json()["detail"]
    deep = api.post(
        "/api/v1/runs/r1/batches", content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert deep.status_code == 422
    changed = run_doc(tensors=[*TENSORS[:2], {**TENSORS[2], "shape": [5]}])
    conflict = api.post("/api/v1/runs", json=changed)
    assert conflict.status_code == 409 and "tensor 2" in conflict.json()["detail"]
    assert api.post("/api/v1/runs", json=run_doc()).json()["created"] is False
    assert api.get("/healthz").status_code == 200 and api.get("/readyz").json()["status"] == "ready"


def test_body_over_the_limit_is_413(collector, tmp_path) -> None:
    url = collector(None, NUMWATCH_MAX_BODY_BYTES="2000")
    with httpx.Client(base_url=url, timeout=30) as client:
        client.post("/api/v1/runs", json=run_doc()).raise_for_status()
        response = post_batch(client, batch_doc(steps=[step_doc(s) for s in range(1, 30)]))
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("name", ["ünïcode-run-✓", "x" * 500, "run'; DROP TABLE steps;--", 'quote"run\\back'])
def test_awkward_run_names_round_trip(api: httpx.Client, name: str) -> None:
    assert api.post("/api/v1/runs", json=run_doc(run=name)).status_code == 200
    from urllib.parse import quote

    assert post_batch(api, batch_doc(run=name, steps=[step_doc(1)]), run=quote(name, safe="")).status_code == 200
    assert api.get(f"/api/v1/runs/{quote(name, safe='')}").json()["last_step"] == 1
    assert api.get("/api/v1/runs/r1").json()["run"] == "r1"


def test_version_1_documents_are_still_stored(api: httpx.Client) -> None:
    """Old clients and old spools send protocol 1: accepted, read back like any step."""
    assert api.post("/api/v1/runs", json={**run_doc(), "protocol": 1}).status_code == 200
    response = post_batch(api, {**batch_doc(steps=[step_doc(1), step_doc(2, loss=0.5)]), "protocol": 1})
    assert response.status_code == 200 and response.json()["stored_steps"] == 2, response.text
    record = api.get("/api/v1/runs/r1/steps/2").json()
    assert record["loss"] == 0.5 and record["tensors"]["embed.weight"]["grad_norm"] == 0.5


def test_clipping_is_stored_and_counted(api: httpx.Client) -> None:
    steps = [
        step_doc(1, clip_coef=1.0, post_clip_grad_norm=0.57, clipped=False),
        step_doc(2, clip_coef=0.25, post_clip_grad_norm=1.0, clipped=True),
        step_doc(3, clip_coef="NaN", post_clip_grad_norm="NaN", clipped=True),
        step_doc(4),  # no clip function ran
    ]
    assert post_batch(api, batch_doc(steps=steps)).status_code == 200
    assert post_batch(api, batch_doc(steps=steps)).json()["stored_steps"] == 0
    assert 'numwatch_clipped_steps_total{rank="0",run="r1"} 2.0' in api.get("/metrics").text
    second = api.get("/api/v1/runs/r1/steps/2").json()
    assert (second["clip_coef"], second["post_clip_grad_norm"], second["clipped"]) == (0.25, 1.0, True)
    fourth = api.get("/api/v1/runs/r1/steps/4").json()
    assert (fourth["clip_coef"], fourth["post_clip_grad_norm"], fourth["clipped"]) == (None, None, False)
    assert api.get("/api/v1/runs/r1/steps/3").json()["clip_coef"] == "NaN"
    old = post_batch(api, batch_doc(steps=[step_doc(5, clipped=True)], protocol=2))
    assert old.status_code == 422 and "steps[0].clipped: needs protocol 3" in old.text


def test_a_copy_that_only_adds_quantization_stats_extends_the_stored_step(api: httpx.Client) -> None:
    quant = {f"quant_sqnr_{scheme}": array([30.0, 20.0, np.nan], "<f4") for scheme in protocol.QUANT_SCHEMES}
    assert post_batch(api, batch_doc(steps=[step_doc(1), step_doc(2)])).json()["stored_steps"] == 2
    added = post_batch(api, batch_doc(steps=[step_doc(2, tensors=quant)])).json()
    assert added == {"stored_steps": 0, "duplicate_steps": 1, "conflicting_steps": 0, "events": 0}
    record = api.get("/api/v1/runs/r1/steps/2").json()["tensors"]["head.weight"]
    assert record["quant_sqnr_nf4"] == 20.0 and record["grad_norm"] == 0.25
    assert api.get("/api/v1/runs/r1/quantization").json()["step"] == 2
    # A copy that changes anything else is a conflict, and the stored step stays as it was.
    changed = post_batch(api, batch_doc(steps=[step_doc(1, norms=[9.0, 9.0, 9.0], tensors=quant)])).json()
    assert changed["conflicting_steps"] == 1
    assert "quant_sqnr_int8" not in api.get("/api/v1/runs/r1/steps/1").json()["tensors"]["head.weight"]
