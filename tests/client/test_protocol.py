"""The wire types in numwatch.protocol and the collector's validating models describe the same documents."""

from __future__ import annotations

import math
from typing import get_args, get_type_hints

import pytest

from numwatch import protocol
from numwatch.monitor.ingest import schemas
from tests.support.collector_docs import array, values

PAIRS = [
    (protocol.RunDocument, schemas.RunDocument),
    (protocol.TensorSpec, schemas.TensorSpec),
    (protocol.BatchDocument, schemas.BatchDocument),
    (protocol.StepDocument, schemas.StepDocument),
    (protocol.Activations, schemas.Activations),
    (protocol.LocalHealth, schemas.LocalHealth),
    (protocol.HistogramDocument, schemas.HistogramDocument),
    (protocol.EventDocument, schemas.EventDocument),
]


@pytest.mark.parametrize("wire, model", PAIRS, ids=[wire.__name__ for wire, _ in PAIRS])
def test_every_wire_field_is_validated_by_the_collector(wire, model):
    assert list(get_type_hints(wire)) == list(model.model_fields)


@pytest.mark.parametrize(
    "model, field, values",
    [
        (schemas.RunDocument, "format", protocol.FORMATS),
        (schemas.HistogramDocument, "kind", protocol.HISTOGRAM_KINDS),
        (schemas.BatchDocument, "status", get_args(protocol.RunStatus)),
        (schemas.RunDocument, "protocol", (1, 2, 3, 4)),  # older documents (old clients, old spools) stay readable
        (schemas.BatchDocument, "protocol", (1, 2, 3, 4)),
    ],
)
def test_collector_accepts_exactly_the_protocol_values(model, field, values):
    prop = model.model_json_schema()["properties"][field]
    assert tuple(prop.get("enum", [prop.get("const")])) == tuple(values)


def test_step_scale_decision_follows_the_scales():
    decisions = [
        protocol.step_document(1, time=0.0, tensors={}, loss_scale=before, new_loss_scale=after)["scale_decision"]
        for before, after in ((1024.0, 2048.0), (1024.0, 512.0), (1024.0, 1024.0), (None, None))
    ]
    assert decisions == ["growth", "backoff", "none", None]
    assert tuple(decisions[:3]) == get_args(protocol.ScaleDecision)


def test_built_documents_validate_and_carry_non_finite_floats():
    n = 2
    stats = {
        name: array([1, 2] if dtype == "<i8" else [math.nan, math.inf], dtype)
        for name, dtype in protocol.TENSOR_STATS.items()
    }
    step = protocol.step_document(
        3,
        time=10.0,
        tensors=stats,
        loss=math.nan,
        loss_scale=8.0,
        new_loss_scale=4.0,
        skipped=True,
        lr=[math.inf, 1e-3],
        global_grad_norm=-math.inf,
        headroom_bits=math.nan,
        scalars={"acc": 0.5},
        attention_logit_max={"h.0.attn": 3.5, "h.1.attn": math.nan},
        output_logits={"log_z_mean": 10.5, "log_z_max": math.inf, "absmax": 2.0},
    )
    histogram = protocol.histogram_document(
        3,
        "grad",
        **{
            name: array([0] * (n * protocol.HISTOGRAM_LENGTHS[name]), dtype)
            for name, dtype in protocol.HISTOGRAM_DTYPES.items()
        },
    )
    event = protocol.event_document(3, "nonfinite_origin", {"module": "head"}, time=11.0)
    batch = protocol.batch_document("r", rank=1, steps=[step], histograms=[histogram], events=[event], status="crashed")
    run = protocol.run_document(
        "r",
        rank=1,
        world_size=2,
        format="bf16",
        tensors=[{"name": "w", "shape": [2], "dtype": "float32", "group": 0}] * n,
    )

    parsed = schemas.BatchDocument.model_validate(protocol.loads(protocol.dumps(batch)))
    schemas.RunDocument.model_validate(protocol.loads(protocol.dumps(run)))
    stored = parsed.steps[0]
    assert math.isnan(stored.loss) and stored.global_grad_norm == -math.inf and stored.lr == [math.inf, 1e-3]
    assert stored.scale_decision == "backoff" and stored.skipped
    assert list(stored.attention_logit_max) == ["h.0.attn", "h.1.attn"] and math.isnan(
        stored.attention_logit_max["h.1.attn"]
    )
    assert stored.output_logits.log_z_max == math.inf and stored.output_logits.log_z_mean == 10.5
    assert parsed.status == "crashed" and parsed.rank == 1 and len(batch["batch_id"]) == 32
    assert parsed.events[0].kind == "nonfinite_origin" and parsed.events[0].time == 11.0
    assert values(batch["steps"][0]["tensors"]["grad_norm"], "<f4")[1] == math.inf


def test_event_kinds_do_not_overlap():
    assert not set(get_args(protocol.ClientEventKind)) & set(get_args(protocol.DetectorEventKind))
