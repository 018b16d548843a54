"""Forward-pass statistics in the collector: stored, attention_logit_growth and log_z_drift events
at the crossing steps (once per episode, across batches), the series per attention call with the
run's maximum, refusals, and a database migrated from before with its rows still readable."""

from __future__ import annotations

import math

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from numwatch.monitor.store import db
from numwatch.protocol import encode_float
from tests.support.collector_docs import batch_doc, post_batch, run_doc, step_doc

NAN = math.nan


def forward(step: int, h0: float, h1: float, log_z: float) -> dict:
    return step_doc(
        step,
        attention_logit_max={"h.0.attn": encode_float(h0), "h.1.attn": encode_float(h1)},
        output_logits={"log_z_mean": log_z, "log_z_max": log_z + 2, "absmax": 3 * log_z},
    )


@pytest.fixture
def api(collector, database_url: str) -> httpx.Client:
    with httpx.Client(base_url=collector(database_url), timeout=30) as client:
        assert client.post("/api/v1/runs", json=run_doc()).status_code == 200
        yield client


def test_events_at_the_crossing_steps_once_per_episode_and_series(api: httpx.Client) -> None:
    first = [forward(1, 10.0, 5.0, 10.0), forward(2, 50.0, 5.0, 20.0), step_doc(3), forward(4, 120.0, 5.0, 31.0)]
    assert post_batch(api, batch_doc(steps=first)).status_code == 200
    # The next batch continues the episodes the first one left: h.0 still above at 5, no event.
    second = [forward(5, 150.0, NAN, 33.0), forward(6, 80.0, 5.0, 40.0), forward(7, 130.0, 5.0, -40.0)]
    assert post_batch(api, batch_doc(steps=second)).status_code == 200

    growth = api.get("/api/v1/runs/r1/events", params={"kind": "attention_logit_growth"}).json()
    assert [(e["step"], e["details"]["layers"]) for e in growth] == [
        (4, [{"name": "h.0.attn", "value": 120.0}]),
        (5, [{"name": "h.1.attn", "value": "NaN"}]),  # a NaN logit names its layer
        (7, [{"name": "h.0.attn", "value": 130.0}]),  # a new episode after falling back at 6
    ]
    assert all(e["details"]["threshold"] == 100.0 for e in growth)
    drift = api.get("/api/v1/runs/r1/events", params={"kind": "log_z_drift"}).json()
    # 33 leaves the band [-32, 32] at 5; 40 stays out; -40 is still out (below): one episode
    assert [(e["step"], e["details"]["log_z_mean"]) for e in drift] == [(5, 33.0)]

    series = api.get("/api/v1/runs/r1/forward").json()
    assert series["steps"] == [1, 2, 4, 5, 6, 7]
    assert series["attention_logit_max"] == {
        "h.0.attn": [10.0, 50.0, 120.0, 150.0, 80.0, 130.0],
        "h.1.attn": [5.0, 5.0, 5.0, "NaN", 5.0, 5.0],
    }
    assert series["run_max"] == {"value": "NaN", "call": "h.1.attn", "step": 5}
    assert series["log_z_mean"] == [10.0, 20.0, 31.0, 33.0, 40.0, -40.0]
    assert series["logit_absmax"] == [30.0, 60.0, 93.0, 99.0, 120.0, -120.0]
    bucketed = api.get("/api/v1/runs/r1/forward", params={"max_points": 3, "start": 2}).json()
    assert bucketed["steps"] == [4, 6, 7]
    assert bucketed["attention_logit_max"]["h.0.attn"] == [120.0, 150.0, 130.0]
    assert bucketed["log_z_mean"] == [25.5, 36.5, -40.0]
    assert api.get("/api/v1/runs/r1/steps/4").status_code == 200


def test_the_step_record_carries_its_forward_statistics(api: httpx.Client) -> None:
    steps = [
        forward(1, 12.5, NAN, -3.0),
        step_doc(2),
        step_doc(3, output_logits=forward(3, 0, 0, 7.0)["output_logits"]),
    ]
    assert post_batch(api, batch_doc(steps=steps)).status_code == 200
    first = api.get("/api/v1/runs/r1/steps/1").json()
    assert first["attention_logit_max"] == {"h.0.attn": 12.5, "h.1.attn": "NaN"}  # forward order, NaN kept
    assert first["output_logits"] == {"log_z_mean": -3.0, "log_z_max": -1.0, "absmax": -9.0}
    unmeasured = api.get("/api/v1/runs/r1/steps/2").json()
    assert unmeasured["attention_logit_max"] is None and unmeasured["output_logits"] is None
    logits_only = api.get("/api/v1/runs/r1/steps/3").json()
    assert logits_only["attention_logit_max"] is None
    assert logits_only["output_logits"] == {"log_z_mean": 7.0, "log_z_max": 9.0, "absmax": 21.0}
    assert api.get("/api/v1/runs/r1/steps/1", params={"rank": 1}).status_code == 404


def test_a_retried_batch_stores_and_judges_nothing_twice(api: httpx.Client) -> None:
    batch = batch_doc(steps=[forward(1, 120.0, 5.0, 0.0)])
    assert post_batch(api, batch).json()["events"] == 1
    assert post_batch(api, batch).json() == {
        "stored_steps": 0,
        "duplicate_steps": 1,
        "conflicting_steps": 0,
        "events": 0,
    }
    assert api.get("/api/v1/runs/r1/forward").json()["steps"] == [1]


def test_older_protocols_and_bad_values_are_refused_naming_the_field(api: httpx.Client) -> None:
    response = post_batch(api, {**batch_doc(steps=[forward(1, 1.0, 2.0, 3.0)]), "protocol": 2})
    assert response.status_code == 422 and "steps[0].attention_logit_max: needs protocol 3" in response.text
    bad = step_doc(1, attention_logit_max={"h.0.attn": [1.0]})
    response = post_batch(api, batch_doc(steps=[bad]))
    assert response.status_code == 422 and "attention_logit_max" in response.text
    bad = step_doc(1, output_logits={"log_z_mean": 1.0})
    response = post_batch(api, batch_doc(steps=[bad]))
    assert response.status_code == 422 and "output_logits" in response.text
    assert api.get("/api/v1/runs/r1/forward").json()["steps"] == []


def test_a_database_from_before_keeps_its_rows_readable(collector, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    with engine.begin() as connection:
        config = db.alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        tables = sa.MetaData()
        tables.reflect(connection)
        run_id = connection.execute(
            tables.tables["runs"]
            .insert()
            .values(
                name="old",
                project="default",
                format="fp16",
                world_size=1,
                tensors=run_doc()["tensors"],
                modules=[],
                config={},
                status="running",
                started_at=sa.func.now(),
                created_at=sa.func.now(),
                last_seen_at=sa.func.now(),
            )
        ).inserted_primary_key[0]
        connection.execute(
            tables.tables["steps"]
            .insert()
            .values(
                run_id=run_id,
                rank=0,
                step=1,
                time=1.0,
                loss=2.5,
                skipped=False,
                lr=[],
                scalars={},
                stat_names="",
                tensor_stats=b"",
            )
        )
        connection.execute(
            tables.tables["rank_state"]
            .insert()
            .values(
                run_id=run_id,
                rank=0,
                last_step=1,
                last_step_time=1.0,
                steps_total=1,
                skipped_steps_total=0,
                nonfinite_steps_total=0,
                nonfinite_loss_total=0,
                loss_scale_backoffs_total=0,
                loss_scale_growths_total=0,
                grad_norm_bucket_counts=[0] * 18,
                grad_norm_sum=0.0,
                layers_nonfinite=0,
                lr=[],
                events_total={},
                spike_state={},
                quant_sqnr_min={},
            )
        )
    engine.dispose()
    with httpx.Client(base_url=collector(url), timeout=30) as client:  # upgrades to the head
        assert client.get("/api/v1/runs/old/steps/1").json()["loss"] == 2.5
        assert client.get("/api/v1/runs/old/forward").json() == {
            "rank": 0,
            "steps": [],
            "attention_logit_max": {},
            "run_max": None,
            "log_z_mean": [],
            "log_z_max": [],
            "logit_absmax": [],
        }
        assert client.post("/api/v1/runs", json=run_doc(run="old")).status_code == 200
        assert (
            post_batch(client, batch_doc(run="old", steps=[forward(2, 101.0, 1.0, 0.0)]), run="old").json()["events"]
            == 1
        )
        assert 'numwatch_attention_logit_max{rank="0",run="old"} 101.0' in client.get("/metrics").text


def test_a_nan_query_in_a_watched_model_is_an_event_naming_its_layer(collector) -> None:
    import torch

    import numwatch
    from tests.support.nanogpt import NanoGPT

    url = collector()
    torch.manual_seed(0)
    model = NanoGPT()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with numwatch.watch(model, optimizer, run="nan-q", url=url, histogram_every=1, on_nonfinite="ignore") as watcher:
        idx = torch.randint(0, 64, (2, 16))
        for step in range(2):
            if step == 1:
                with torch.no_grad():
                    model.transformer.h[2].attn.c_attn.weight[0, 0] = math.nan  # one query feature of layer 2
            model(idx, idx)[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        watcher.flush()
    with httpx.Client(base_url=url, timeout=30) as client:
        (event,) = client.get("/api/v1/runs/nan-q/events", params={"kind": "attention_logit_growth"}).json()
        series = client.get("/api/v1/runs/nan-q/forward").json()
    assert event["step"] == 2
    # layer 2's logits are NaN, and so are those of every layer after it
    assert event["details"]["layers"] == [{"name": f"transformer.h.{i}.attn", "value": "NaN"} for i in (2, 3)]
    assert all(
        isinstance(series["attention_logit_max"][f"transformer.h.{i}.attn"][1], float) for i in (0, 1)
    )  # finite before it
