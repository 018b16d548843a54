"""The step ledger: each step's stage moves only by its named transitions; one out of order is logged, never raised."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from numwatch.delivery.nonfinite import NonFiniteError
from numwatch.step import records
from numwatch.step.ledger import TRANSITIONS, LedgerEntry, Stage, Transition
from numwatch.step.measurement import StepMeasurement
from tests.support.ledger_rig import LedgerRig, backward, float64_norms, ledger_rig, linear_model

LEGAL = [(transition, source) for transition in TRANSITIONS for source in sorted(transition.sources, key=str)]
ILLEGAL = [(transition, stage) for transition in TRANSITIONS for stage in Stage if stage not in transition.sources]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "numwatch"]


def _entry_at(stage: Stage) -> LedgerEntry:
    entry = LedgerEntry(StepMeasurement(7))
    entry.stage = stage
    return entry


def test_the_transition_table_is_the_documented_graph():
    edges = {(source.name, transition.name, transition.target.name) for transition, source in LEGAL}
    assert edges == {
        ("MEASURING", "count", "COUNTED"),
        ("COUNTED", "end", "ENDED"),
        ("COUNTED", "discard", "DISCARDED"),
        ("ENDED", "seal", "SEALED"),
        ("SEALED", "wait for host copy", "AWAITING_HOST"),
        ("SEALED", "hand on", "HANDED_ON"),
        ("AWAITING_HOST", "hand on", "HANDED_ON"),
    }


@pytest.mark.parametrize(("transition", "source"), LEGAL, ids=lambda v: getattr(v, "name", str(v)))
def test_every_legal_transition_moves_the_step(transition: Transition, source: Stage, caplog):
    entry = _entry_at(source)
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        assert entry.advance(transition) is True
    assert entry.stage is transition.target
    assert _warnings(caplog) == []


@pytest.mark.parametrize(("transition", "stage"), ILLEGAL, ids=lambda v: getattr(v, "name", str(v)))
def test_every_illegal_transition_is_logged_by_name_and_not_made(transition: Transition, stage: Stage, caplog):
    entry = _entry_at(stage)
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        assert entry.advance(transition) is False  # nothing raised
    assert entry.stage is stage
    (message,) = _warnings(caplog)
    assert f"'{transition.name}' out of order" in message and f"step 7 is {stage.value}" in message


def _measured_step(rig: LedgerRig, seed: int) -> np.ndarray:
    """A backward read into the step under way, counted and ended; the float64 norms it read."""
    backward(rig.model, seed)
    expected = float64_norms([p.grad for p in rig.model.parameters()])
    rig.ledger.read_gradients()
    rig.ledger.count_step()
    rig.ledger.end_step(skip_known=None)
    for p in rig.model.parameters():
        p.grad = None
    return expected


def test_a_cpu_step_goes_from_measuring_to_handed_on_and_takes_late_values_until_sealed():
    rig = ledger_rig(linear_model())
    ledger = rig.ledger
    backward(rig.model, 1)
    reference = float64_norms([p.grad for p in rig.model.parameters()])
    ledger.read_gradients()
    assert ledger.stage_of(1) is Stage.MEASURING and ledger.steps == 0
    ledger.count_step()
    assert ledger.stage_of(1) is Stage.COUNTED and ledger.steps == 1
    ledger.end_step(skip_known=None)
    assert ledger.stage_of(1) is Stage.ENDED and ledger.under_way is None
    # On CPU, checked at once (before the update); the gradients, seen finite when read, are not read again.
    assert rig.checker.checked == [(1, False)]
    assert rig.submitted == []
    ledger.log({"loss": 2.5, "accuracy": 0.75})  # after the step ended: still its values
    ledger.seal_ended()
    assert ledger.stage_of(1) is Stage.HANDED_ON
    (record,) = rig.submitted
    assert rig.checker.checked == [(1, False), (1, False)]  # the late loss is checked, the gradients were
    assert record.step_number == 1 and record.loss_value() == 2.5 and record.scalars == {"accuracy": 0.75}
    np.testing.assert_allclose(record.grad_rows()[0], reference, rtol=1e-6)
    ledger.log({"loss": 9.0})  # sealed: the value belongs to the next step
    assert ledger.under_way is not None and ledger.under_way.number == 2 and ledger.under_way.logged == {"loss": 9.0}
    assert record.loss_value() == 2.5


def test_on_accelerators_a_sealed_step_awaits_its_host_copy_and_is_checked_and_sent_once():
    rig = ledger_rig(linear_model(), defer_checks=True)
    ledger = rig.ledger
    first = _measured_step(rig, 1)
    assert ledger.stage_of(1) is Stage.ENDED and rig.checker.checked == []
    ledger.seal_ended()  # the model's next forward
    assert ledger.stage_of(1) is Stage.AWAITING_HOST and rig.submitted == [] and rig.checker.checked == []
    second = _measured_step(rig, 2)  # the next step's end reads the first one's host copy
    assert ledger.stage_of(1) is None and ledger.stage_of(2) is Stage.ENDED  # step 1 handed on, let go
    assert rig.checker.checked == [(1, True)] and rig.numbers() == [1]
    for _ in range(3):
        ledger.settle()  # flush(), repeatedly
    ledger.close()
    assert ledger.stage_of(2) is Stage.HANDED_ON
    assert rig.checker.checked == [(1, True), (2, True)] and rig.numbers() == [1, 2]
    for record, expected in zip(rig.submitted, (first, second), strict=True):
        np.testing.assert_allclose(record.grad_rows()[0], expected, rtol=1e-6)


def test_a_failed_step_is_counted_and_discarded_and_the_next_one_is_measured():
    rig = ledger_rig(linear_model())
    ledger = rig.ledger
    backward(rig.model, 1)
    ledger.read_gradients()
    ledger.fail()  # monitoring failed somewhere in step 1
    assert ledger.under_way is not None and ledger.under_way.failed
    ledger.count_step()
    ledger.end_step(skip_known=None)
    assert ledger.steps == 1 and ledger.stage_of(1) is None and rig.submitted == [] and rig.checker.checked == []
    expected = _measured_step(rig, 2)
    ledger.close()
    (record,) = rig.submitted
    assert record.step_number == 2
    np.testing.assert_allclose(record.grad_rows()[0], expected, rtol=1e-6)


def test_ending_a_step_that_was_not_counted_is_logged_and_not_done(caplog):
    rig = ledger_rig(linear_model())
    ledger = rig.ledger
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        ledger.end_step(skip_known=None)
        backward(rig.model, 1)
        ledger.read_gradients()
        ledger.end_step(skip_known=None)
    assert _warnings(caplog) == [
        "numwatch: step ledger: 'end' out of order (no step under way); not made",
        "numwatch: step ledger: 'end' out of order (step 1 is measuring); not made",
    ]
    assert ledger.stage_of(1) is Stage.MEASURING and ledger.under_way is not None and ledger.under_way.reading
    assert rig.submitted == [] and ledger.steps == 0


def test_counting_a_counted_step_again_is_logged_and_the_attempt_still_counts(caplog):
    rig = ledger_rig(linear_model())
    ledger = rig.ledger
    backward(rig.model, 1)
    ledger.read_gradients()
    ledger.count_step()
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        ledger.count_step()
    assert _warnings(caplog) == ["numwatch: step ledger: 'count' out of order (step 1 is counted); not made"]
    assert ledger.steps == 2 and ledger.stage_of(1) is Stage.COUNTED
    ledger.end_step(skip_known=None)
    ledger.close()
    assert rig.numbers() == [1]


@pytest.mark.parametrize("defer_checks", [False, True], ids=["cpu", "accelerator"])
def test_a_check_that_raises_reaches_the_caller_and_the_step_is_still_sent(defer_checks: bool):
    rig = ledger_rig(linear_model(), defer_checks=defer_checks, raise_at={1})
    ledger = rig.ledger
    backward(rig.model, 1)
    ledger.read_gradients()
    ledger.count_step()
    if defer_checks:
        ledger.end_step(skip_known=None)
        ledger.seal_ended()
        with pytest.raises(NonFiniteError, match="step 1"):
            ledger.settle()  # the host copy is read (checked) here
    else:
        with pytest.raises(NonFiniteError, match="step 1"):
            ledger.end_step(skip_known=None)  # on_nonfinite="raise" stops training before the update
        assert ledger.stage_of(1) is Stage.ENDED
        ledger.settle()
    assert ledger.stage_of(1) is Stage.HANDED_ON and rig.numbers() == [1]


def test_statistics_measured_at_close_join_an_ended_step_or_follow_a_sealed_one():
    rig = ledger_rig(linear_model())
    ledger = rig.ledger
    _measured_step(rig, 1)
    quant = rig.watched.quant_parts()
    ledger.add_final_parts(quant)  # step 1 is ENDED: its own record takes them
    ledger.close()
    (record,) = rig.submitted
    np.testing.assert_allclose(record.late.get(records.QUANT), quant[records.QUANT].double().numpy(), rtol=1e-6)

    rig = ledger_rig(linear_model())
    ledger = rig.ledger
    _measured_step(rig, 1)
    ledger.seal_ended()
    ledger.add_final_parts(quant)  # step 1 was sent: a supplement follows it
    ledger.close()
    sent, supplement = rig.submitted
    assert sent.step_number == supplement.step_number == 1
    assert not sent.has_part(records.QUANT) and supplement.has_part(records.QUANT)
    np.testing.assert_allclose(supplement.supplement.get(records.QUANT), quant[records.QUANT].double().numpy())
