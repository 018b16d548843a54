"""Bad input over real HTTP, on SQLite and PostgreSQL: the regressions tests/test_fuzz_api.py found
(each was a 500), and bad-input cases tests/test_ingest.py does not cover.

Split from tests/test_ingest.py (whose ``api`` fixture and helper it shares) to keep each file under a minute.
"""

from __future__ import annotations

import httpx

from numwatch import protocol
from tests.support.collector_docs import TENSORS, batch_doc, post_batch, run_doc, step_doc


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


FLOAT_FIELDS_NOT_NUMBERS = [
    ("loss", [1.0]),
    ("global_grad_norm", {"value": 1.0}),
    ("loss_scale", 10**400),
    ("lr", [10**400]),
    ("scalars", {"accuracy": [0.5]}),
]
# One server per test, several cases in it: each server start costs about a second.


def test_float_fields_holding_lists_objects_or_huge_integers_are_422(api: httpx.Client) -> None:
    for field, value in FLOAT_FIELDS_NOT_NUMBERS:
        step = step_doc(1)
        step[field] = value  # float() raised TypeError / OverflowError here: a 500 before
        response = post_batch(api, batch_doc(steps=[step]))
        assert response.status_code == 422, (field, response.text)
        assert f"steps[0].{field}" in str(response.json()["detail"])
    assert api.get("/api/v1/runs/r1").json()["steps_total"] == 0


def test_run_start_time_outside_datetimes_or_not_finite_is_422(api: httpx.Client) -> None:
    for started_at in (1e300, -1e300, 1e18, -1.0, "NaN", "Infinity"):
        document = {**run_doc(run="late"), "started_at": started_at}  # datetime.fromtimestamp overflowed: a 500 before
        response = api.post(
            "/api/v1/runs", content=protocol.dumps(document), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422 and "started_at" in str(response.json()["detail"]), (
            started_at,
            response.text,
        )
    assert api.get("/api/v1/runs/late").status_code == 404


# Lone low and high surrogate escapes, NUL, and a surrogate encoded as raw UTF-8 bytes.
UNSTORABLE_TEXTS = [b'"\\udc80"', b'"lone \\ud83d high"', b'"nul \\u0000 inside"', b'"\xed\xb2\x80"']


def test_text_the_database_cannot_store_is_422_in_every_free_form_field(api: httpx.Client) -> None:
    """Lone surrogates were stored and made every later read of the run a 500; PostgreSQL refuses NUL."""
    marker = b'"__BAD__"'
    event = {"step": 1, "kind": "note", "time": 1.0, "details": {"text": "__BAD__"}}
    run_documents = [
        run_doc(run="__BAD__"),
        {**run_doc(run="u1"), "config": {"note": "__BAD__"}},
        {**run_doc(run="u2"), "config": {"__BAD__": 1}},
        {**run_doc(run="u3"), "modules": ["__BAD__"]},
    ]
    batches = [
        batch_doc(steps=[step_doc(1)], events=[event]),
        batch_doc(steps=[step_doc(1, scalars={"__BAD__": 1.0})]),
        batch_doc(steps=[step_doc(1)], batch_id="__BAD__"),
    ]
    for bad_text in UNSTORABLE_TEXTS:
        for path, document in [("/api/v1/runs", d) for d in run_documents] + [
            ("/api/v1/runs/r1/batches", b) for b in batches
        ]:
            body = protocol.dumps(document).replace(marker, bad_text)
            response = api.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (bad_text, document, response.text)
    assert [r["run"] for r in api.get("/api/v1/runs").json()] == ["r1"]
    assert api.get("/api/v1/runs/r1/events").json() == [] and api.get("/api/v1/runs/r1").json()["steps_total"] == 0


def test_step_and_event_times_past_year_9999_are_422(api: httpx.Client) -> None:
    """An event at t=1e308 was stored, then its time_ms (t*1000 = inf) made reads of its events a 500."""
    event = {"step": 1, "kind": "note", "time": 1e308, "details": {}}
    responses = [
        post_batch(api, batch_doc(steps=[step_doc(1)], events=[event])),
        post_batch(api, batch_doc(steps=[step_doc(1, time=1e308)])),
        post_batch(api, batch_doc(steps=[step_doc(1, time=-1.0)])),
    ]
    assert [r.status_code for r in responses] == [422, 422, 422], [r.text for r in responses]
    assert "events[0].time" in str(responses[0].json()["detail"]) and "steps[0].time" in str(
        responses[1].json()["detail"]
    )
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
        protocol.dumps(
            batch_doc(steps=[step_doc(1)], events=[{"step": 1, "kind": "note", "time": "NaN", "details": {}}])
        ),
        protocol.dumps(batch_doc(steps=[step_doc(1, tensors={"nan_count": "NaN"})])),
    ]
    for body in cases:
        response = api.post("/api/v1/runs/r1/batches", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
    assert api.get("/api/v1/runs/r1").json()["steps_total"] == 0


SQL_TEXT = "x'); DROP TABLE steps; -- \" ` % _ \\ ;"


def test_sql_metacharacters_round_trip_in_every_string_field(api: httpx.Client) -> None:
    tensors = [{**t, "name": f"{t['name']}{SQL_TEXT}", "dtype": f"float32{SQL_TEXT}"} for t in TENSORS]
    run = {
        **run_doc(run=SQL_TEXT, project=f"p{SQL_TEXT}", tensors=tensors),
        "modules": [SQL_TEXT],
        "config": {SQL_TEXT: SQL_TEXT},
    }
    # Auth is off here, so the project is not a token's scope.
    assert api.post("/api/v1/runs", json=run).status_code == 200
    from urllib.parse import quote

    path_run = quote(SQL_TEXT, safe="")
    event = {"step": 1, "kind": "note';--", "time": 1.0, "details": {SQL_TEXT: SQL_TEXT}}
    batch = batch_doc(run=SQL_TEXT, steps=[step_doc(1, scalars={SQL_TEXT: 2.5})], events=[event], batch_id=SQL_TEXT)
    assert post_batch(api, batch, run=path_run).status_code == 200
    detail = api.get(f"/api/v1/runs/{path_run}").json()
    assert (
        detail["project"] == f"p{SQL_TEXT}"
        and detail["modules"] == [SQL_TEXT]
        and detail["config"] == {SQL_TEXT: SQL_TEXT}
    )
    assert [t["name"] for t in detail["tensors"]] == [t["name"] for t in tensors]
    assert api.get(f"/api/v1/runs/{path_run}/steps/1").json()["scalars"] == {SQL_TEXT: 2.5}
    assert [e["details"] for e in api.get(f"/api/v1/runs/{path_run}/events", params={"kind": "note';--"}).json()] == [
        {SQL_TEXT: SQL_TEXT}
    ]
    series = api.get(
        f"/api/v1/runs/{path_run}/series", params={"metric": "grad_norm", "tensor": tensors[2]["name"]}
    ).json()
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

    from numwatch.monitor.app import create_app
    from numwatch.monitor.settings import Settings

    spec = create_app(Settings(database_url="sqlite://")).openapi()
    for path in ("/api/v1/runs", "/api/v1/runs/{run}/batches"):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert "$defs" not in json.dumps(body) and body["required"]
        assert {"401", "413", "415", "422"} <= set(operation["responses"])
    assert (
        "tensors"
        in spec["paths"]["/api/v1/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    step = spec["paths"]["/api/v1/runs/{run}/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"
    ]["steps"]["items"]
    assert "global_grad_norm" in step["properties"]
    for path in ("/api/v1/runs/{run}", "/api/v1/runs/{run}/steps/{step}"):
        assert {"401", "404", "422"} <= set(spec["paths"][path]["get"]["responses"])
