"""The write API over real HTTP to a real collector process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from hooks import protocol
from tests.collector_docs import NUMEL, TENSORS, array, batch_doc, run_doc, step_doc


@pytest.fixture
def api(collector, database_url: str) -> httpx.Client:
    with httpx.Client(base_url=collector(database_url), timeout=30) as client:
        assert client.post("/api/v1/runs", json=run_doc()).status_code == 200
        yield client


def post_batch(client: httpx.Client, doc: dict, run: str = "r1") -> httpx.Response:
    return client.post(f"/api/v1/runs/{run}/batches", content=protocol.dumps(doc), headers={"Content-Type": "application/json"})


def test_round_trip_keeps_values_nan_and_inf_exactly(api: httpx.Client) -> None:
    steps = [step_doc(1), step_doc(2, norms=[0.5, float("nan"), float("inf")], loss=float("nan"), headroom_bits="-Infinity")]
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
    assert events == {"loss_scale_backoff": 1, "loss_scale_growth": 1, "nonfinite_grad": 1, "skipped_step": 1, "underflow_high": 1}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda b: b["steps"][1]["tensors"].update(grad_norm=array([1.0, 2.0], "<f4")), "steps[1].tensors.grad_norm: expected 3 values, got 2"),
        (lambda b: b["steps"][0]["tensors"].update(grad_norm="%%%"), "steps[0].tensors"),
        (lambda b: b["steps"][0].update(step=-4), "steps[0].step"),
        (lambda b: b["steps"][0].update(step=2**70), "steps[0].step"),
        (lambda b: b["steps"][0].update(loss="nan-ish"), "steps[0].loss"),
        (lambda b: b["steps"][0].update(time="NaN"), "steps[0].time"),
        (lambda b: b["steps"][0].update(scale_decision="maybe"), "steps[0].scale_decision"),
        (lambda b: b.update(protocol=2), "protocol"),
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
    assert api.post("/api/v1/runs/nope/batches", content=protocol.dumps(batch_doc(run="nope")), headers={"Content-Type": "application/json"}).status_code == 404
    assert api.post("/api/v1/runs/r1/batches", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    truncated = api.post("/api/v1/runs/r1/batches", content=protocol.dumps(batch_doc(steps=[step_doc(1)]))[:-7], headers={"Content-Type": "application/json"})
    assert truncated.status_code == 422 and "not valid JSON" in truncated.json()["detail"]
    deep = api.post("/api/v1/runs/r1/batches", content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"})
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


# Regressions found by tests/test_fuzz_api.py (each was a 500) and the remaining bad-input cases.


def test_step_and_rank_past_bigint_in_read_parameters_are_422(api: httpx.Client) -> None:
    assert post_batch(api, batch_doc(steps=[step_doc(1)])).status_code == 200
    huge = 2**64 - 1  # reached the database as an integer it cannot bind: a 500 before
    responses = [
        api.get(f"/api/v1/runs/r1/steps/{huge}"),
        api.get("/api/v1/runs/r1/steps/1", params={"rank": huge}),
        api.get("/api/v1/runs/r1/series", params={"metric": "loss", "start": huge}),
        api.get("/api/v1/runs/r1/series", params={"metric": "loss", "end": huge}),
        api.get("/api/v1/runs/r1/histograms", params={"tensor": "head.bias", "step": huge}),
        api.get("/api/v1/runs/r1/heatmap", params={"rank": huge}),
    ]
    assert [r.status_code for r in responses] == [422] * len(responses), [r.text for r in responses]
    assert api.get("/api/v1/runs/r1/steps/1").status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [("loss", [1.0]), ("global_grad_norm", {"value": 1.0}), ("loss_scale", 10**400), ("lr", [10**400]), ("scalars", {"accuracy": [0.5]})],
)
def test_float_fields_holding_lists_objects_or_huge_integers_are_422(api: httpx.Client, field: str, value: object) -> None:
    step = step_doc(1)
    step[field] = value  # float() raised TypeError / OverflowError here: a 500 before
    response = post_batch(api, batch_doc(steps=[step]))
    assert response.status_code == 422, response.text
    assert f"steps[0].{field}" in str(response.json()["detail"])
    assert api.get("/api/v1/runs/r1").json()["steps_total"] == 0


@pytest.mark.parametrize("started_at", [1e300, -1e300, 1e18, -1.0, "NaN", "Infinity"])
def test_run_start_time_outside_datetimes_or_not_finite_is_422(api: httpx.Client, started_at: object) -> None:
    document = {**run_doc(run="late"), "started_at": started_at}  # datetime.fromtimestamp overflowed: a 500 before
    response = api.post("/api/v1/runs", content=protocol.dumps(document), headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "started_at" in str(response.json()["detail"]), response.text
    assert api.get("/api/v1/runs/late").status_code == 404


@pytest.mark.parametrize(
    "bad_text",
    [b'"\\udc80"', b'"lone \\ud83d high"', b'"nul \\u0000 inside"', b'"\xed\xb2\x80"'],
    ids=["lone-low-surrogate", "lone-high-surrogate", "nul", "utf8-encoded-surrogate"],
)
def test_text_the_database_cannot_store_is_422_in_every_free_form_field(api: httpx.Client, bad_text: bytes) -> None:
    """Lone surrogates were stored and made every later read of the run a 500; PostgreSQL refuses NUL."""
    marker = b'"__BAD__"'
    run_documents = [
        {**run_doc(run="__BAD__")},
        {**run_doc(run="u1"), "config": {"note": "__BAD__"}},
        {**run_doc(run="u2"), "config": {"__BAD__": 1}},
        {**run_doc(run="u3"), "modules": ["__BAD__"]},
    ]
    for document in run_documents:
        body = protocol.dumps(document).replace(marker, bad_text)
        response = api.post("/api/v1/runs", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, (document, response.text)
    event = {"step": 1, "kind": "note", "time": 1.0, "details": {"text": "__BAD__"}}
    step = step_doc(1, scalars={"__BAD__": 1.0})
    for batch in (batch_doc(steps=[step_doc(1)], events=[event]), batch_doc(steps=[step]), batch_doc(steps=[step_doc(1)], batch_id="__BAD__")):
        body = protocol.dumps(batch).replace(marker, bad_text)
        response = api.post("/api/v1/runs/r1/batches", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
    assert [r["run"] for r in api.get("/api/v1/runs").json()] == ["r1"]
    assert api.get("/api/v1/runs/r1/events").json() == [] and api.get("/api/v1/runs/r1").json()["steps_total"] == 0


def test_step_and_event_times_past_year_9999_are_422(api: httpx.Client) -> None:
    """An event at t=1e308 was stored, then its time_ms (t*1000 = inf) made reads of its events a 500."""
    event = {"step": 1, "kind": "note", "time": 1e308, "details": {}}
    responses = [post_batch(api, batch_doc(steps=[step_doc(1)], events=[event])), post_batch(api, batch_doc(steps=[step_doc(1, time=1e308)])),
                 post_batch(api, batch_doc(steps=[step_doc(1, time=-1.0)]))]
    assert [r.status_code for r in responses] == [422, 422, 422], [r.text for r in responses]
    assert "events[0].time" in str(responses[0].json()["detail"]) and "steps[0].time" in str(responses[1].json()["detail"])
    assert api.get("/api/v1/runs/r1/events").json() == []


def test_steps_out_of_order_are_stored_and_read_back_in_step_order(api: httpx.Client) -> None:
    assert post_batch(api, batch_doc(steps=[step_doc(s, loss=float(s)) for s in (5, 2, 9)])).status_code == 200
    assert post_batch(api, batch_doc(steps=[step_doc(s, loss=float(s)) for s in (1, 7)])).status_code == 200
    series = api.get("/api/v1/runs/r1/series", params={"metric": "loss"}).json()
    assert series == {"steps": [1, 2, 5, 7, 9], "values": [1.0, 2.0, 5.0, 7.0, 9.0]}
    summary = api.get("/api/v1/runs/r1").json()
    assert summary["steps_total"] == 5 and summary["last_step"] == 9


def test_non_finite_values_where_the_protocol_allows_none_are_422(api: httpx.Client) -> None:
    bare_nan = protocol.dumps(batch_doc(steps=[step_doc(1)])).replace(b'"loss":1.0', b'"loss":NaN')
    assert b"NaN" in bare_nan
    cases = [
        bare_nan,  # bare NaN is not JSON; the protocol spells it "NaN"
        protocol.dumps(batch_doc(steps=[step_doc(1, step_time=None, time="Infinity")])),
        protocol.dumps(batch_doc(steps=[step_doc(1)], events=[{"step": 1, "kind": "note", "time": "NaN", "details": {}}])),
        protocol.dumps(batch_doc(steps=[step_doc(1, tensors={"nan_count": "NaN"})])),
    ]
    for body in cases:
        response = api.post("/api/v1/runs/r1/batches", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
    assert api.get("/api/v1/runs/r1").json()["steps_total"] == 0


SQL_TEXT = "x'); DROP TABLE steps; -- \" ` % _ \\ ;"


def test_sql_metacharacters_round_trip_in_every_string_field(api: httpx.Client) -> None:
    tensors = [{**t, "name": f"{t['name']}{SQL_TEXT}", "dtype": f"float32{SQL_TEXT}"} for t in TENSORS]
    run = {**run_doc(run=SQL_TEXT, project=f"p{SQL_TEXT}", tensors=tensors), "modules": [SQL_TEXT], "config": {SQL_TEXT: SQL_TEXT}}
    # Auth is off here, so the project is not a token's scope.
    assert api.post("/api/v1/runs", json=run).status_code == 200
    from urllib.parse import quote

    path_run = quote(SQL_TEXT, safe="")
    event = {"step": 1, "kind": "note';--", "time": 1.0, "details": {SQL_TEXT: SQL_TEXT}}
    batch = batch_doc(run=SQL_TEXT, steps=[step_doc(1, scalars={SQL_TEXT: 2.5})], events=[event], batch_id=SQL_TEXT)
    assert post_batch(api, batch, run=path_run).status_code == 200
    detail = api.get(f"/api/v1/runs/{path_run}").json()
    assert detail["project"] == f"p{SQL_TEXT}" and detail["modules"] == [SQL_TEXT] and detail["config"] == {SQL_TEXT: SQL_TEXT}
    assert [t["name"] for t in detail["tensors"]] == [t["name"] for t in tensors]
    assert api.get(f"/api/v1/runs/{path_run}/steps/1").json()["scalars"] == {SQL_TEXT: 2.5}
    assert [e["details"] for e in api.get(f"/api/v1/runs/{path_run}/events", params={"kind": "note';--"}).json()] == [{SQL_TEXT: SQL_TEXT}]
    series = api.get(f"/api/v1/runs/{path_run}/series", params={"metric": "grad_norm", "tensor": tensors[2]["name"]}).json()
    assert series == {"steps": [1], "values": [0.125]}
    # Metacharacters in query parameters are values, not SQL: not found, and every table is intact.
    assert api.get(f"/api/v1/runs/{path_run}/series", params={"metric": SQL_TEXT}).status_code == 404
    assert api.get(f"/api/v1/runs/{path_run}/heatmap", params={"stat": SQL_TEXT}).status_code == 404
    assert api.get(f"/api/v1/runs/{path_run}/events", params={"kind": SQL_TEXT}).json() == []
    assert post_batch(api, batch_doc(steps=[step_doc(1)])).status_code == 200
    assert api.get("/api/v1/runs/r1/steps/1").status_code == 200


def test_run_names_over_the_length_limit_are_422(api: httpx.Client) -> None:
    response = api.post("/api/v1/runs", json=run_doc(run="x" * 513))
    assert response.status_code == 422 and "run" in str(response.json()["detail"])


def test_openapi_request_bodies_are_self_contained_and_refusals_documented() -> None:
    """The write bodies referenced ``#/$defs/...`` that do not exist in an OpenAPI document, so
    schema-driven clients (schemathesis) sent no body at all; 401/404/415 were undocumented."""
    import json

    from monitor.app import create_app
    from monitor.settings import Settings

    spec = create_app(Settings(database_url="sqlite://")).openapi()
    for path in ("/api/v1/runs", "/api/v1/runs/{run}/batches"):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert "$defs" not in json.dumps(body) and body["required"]
        assert {"401", "413", "415", "422"} <= set(operation["responses"])
    assert "tensors" in spec["paths"]["/api/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    step = spec["paths"]["/api/v1/runs/{run}/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["steps"]["items"]
    assert "global_grad_norm" in step["properties"]
    for path in ("/api/v1/runs/{run}", "/api/v1/runs/{run}/steps/{step}"):
        assert {"401", "404", "422"} <= set(spec["paths"][path]["get"]["responses"])
