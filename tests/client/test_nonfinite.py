"""The non-finite policy on its own: one origin event, rate-limited warnings, or the error training asked for."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from numwatch import protocol
from numwatch.delivery.nonfinite import NAMED_TENSORS, NonFiniteCheck, NonFiniteError
from numwatch.formats import format_spec
from numwatch.step.measurement import Cadence, StepMeasurement, WatchedTensors, select_parameters
from numwatch.step.records import StepRecord

TENSORS = 12


class _Tensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.ParameterList(nn.Parameter(torch.ones(3)) for _ in range(TENSORS))


def _record(step: int, bad: dict[int, tuple[int, int]], loss: float = 0.5) -> tuple[StepRecord, list[str]]:
    """A measured step whose tensor i holds bad[i] = (NaN count, Inf count) non-finite values."""
    model = _Tensors()
    watched = WatchedTensors(select_parameters(model, None, None), format_spec("fp32"), Cadence(0, 0))
    for i, p in enumerate(model.p):
        nan, inf = bad.get(i, (0, 0))
        p.grad = torch.tensor([math.nan] * nan + [math.inf] * inf + [0.25] * (3 - nan - inf))
    measurement = StepMeasurement(step)
    measurement.read(watched, None, None)
    assert measurement.reading is not None
    watched.count_nonfinite(measurement.reading)
    measurement.log({"loss": loss})
    return measurement.finish(watched, step_time=None, module_parts=None), watched.names


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_finite_step_passes_unremarked(caplog):
    record, names = _record(1, {})
    check = NonFiniteCheck("r", names, "raise", None)
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        check.check(record)
    assert record.events == [] and check.seen_at == -math.inf and _warnings(caplog) == []


def test_the_first_non_finite_step_gets_the_origin_event_and_every_one_warns_once_per_kind(caplog):
    first, names = _record(3, {1: (2, 0), 4: (0, 1)}, loss=math.inf)
    check = NonFiniteCheck("r", names, "warn", None)
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        check.check(first)
        repeats = [_record(step, {1: (2, 0), 4: (0, 1)}, loss=math.inf)[0] for step in (4, 5)]
        for record in repeats:
            check.check(record)
        check.warnings.report_repeats()
    (event,) = first.events
    assert event["kind"] == "nonfinite_origin" and event["step"] == 3
    assert event["details"] == {
        "tensors": [{"name": "p.1", "nan": 2, "inf": 0}, {"name": "p.4", "nan": 0, "inf": 1}],
        "nonfinite_tensors": 2,
        "loss": protocol.encode_float(math.inf),
        "module": None,
    }
    assert all(record.events == [] for record in repeats)  # the origin is reported once
    assert check.seen_at == 5
    assert _warnings(caplog) == [
        "numwatch: non-finite values at step 3 of run 'r': loss=inf; gradients: p.1 (nan=2, inf=0), p.4 (nan=0, inf=1)",
        "numwatch: the previous warning repeated 2 more times",
    ]


def test_raise_names_at_most_the_first_tensors_and_counts_the_rest():
    record, names = _record(2, {i: (1, 0) for i in range(TENSORS)})
    with pytest.raises(NonFiniteError) as raised:
        NonFiniteCheck("r", names, "raise", None).check(record)
    message = str(raised.value)
    assert all(f"p.{i} (nan=1, inf=0)" in message for i in range(NAMED_TENSORS))
    assert f"p.{NAMED_TENSORS} " not in message and f"and {TENSORS - NAMED_TENSORS} more" in message
    assert record.events[0]["details"]["nonfinite_tensors"] == TENSORS


def test_a_late_loss_alone_is_checked_without_the_gradients_and_ignore_stays_silent(caplog):
    record, names = _record(7, {0: (3, 0)}, loss=math.nan)
    check = NonFiniteCheck("r", names, "ignore", None)
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        check.check(record, gradients=False)  # the gradients were checked when the step ended
    details = record.events[0]["details"]
    assert details["tensors"] == [] and details["nonfinite_tensors"] == 0
    assert details["loss"] == protocol.encode_float(math.nan)
    assert _warnings(caplog) == [] and check.seen_at == 7


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        NonFiniteCheck("r", [], "explode", None)
