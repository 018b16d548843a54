"""The step sites, each on its own with a real ledger: where a step is counted, when it ends, what it carries."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from numwatch.step import records
from numwatch.step.ledger import Stage
from numwatch.step.measurement import StepMeasurement
from numwatch.step.sites import FrameworkSite, FusedScalerSite, OptimizerHookSite, ScalerSite, StepCallSite
from tests.support.ledger_rig import backward, float64_norms, ledger_rig, linear_model
from tests.support.watch_helpers import BackwardInjection


def _grad_norms(model: torch.nn.Module, divide_by: float = 1.0) -> np.ndarray:
    return float64_norms([p.grad.double() / divide_by for p in model.parameters()])


def test_optimizer_hook_site_ends_plain_steps_before_the_update_and_sampled_ones_after_it():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rig = ledger_rig(model, optimizer=optimizer, histogram_every=2)  # steps 1 and 3 are sampled
    OptimizerHookSite(rig.ledger, rig.guard, optimizer)
    left_open: list[bool] = []  # registered after the site's pre-hook, so it runs after it
    optimizer.register_step_pre_hook(lambda *_: left_open.append(rig.ledger.counted() is not None))
    grads, weights = [], []
    for step in range(1, 5):
        optimizer.zero_grad()
        backward(model, step)
        grads.append(_grad_norms(model))
        optimizer.step()  # no end-of-backward read here: the site reads the gradients itself
        weights.append(float64_norms(list(model.parameters())))
        rig.ledger.seal_ended()
    rig.ledger.close()
    assert left_open == [True, False, True, False]
    assert rig.ledger.steps == 4 and rig.numbers() == [1, 2, 3, 4] and rig.guard.errors == 0
    for step, record in enumerate(rig.submitted, start=1):
        np.testing.assert_allclose(record.grad_rows()[0], grads[step - 1], rtol=1e-6)
        assert record.lr == [0.1]
        assert record.has_part(records.WEIGHT) == (step in (1, 3))
        if step in (1, 3):  # measured after the update
            np.testing.assert_allclose(record.host.get(records.WEIGHT)[0], weights[step - 1], rtol=1e-6)


def test_optimizer_hook_site_counts_a_step_once_when_its_hook_also_runs_by_hand():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rig = ledger_rig(model, optimizer=optimizer, histogram_every=1)
    site = OptimizerHookSite(rig.ledger, rig.guard, optimizer)
    backward(model, 1)
    expected = _grad_norms(model)
    site.before_step(optimizer, (optimizer,), {})  # as the watcher does for an optimizer it just found
    optimizer.step()  # and torch runs the hook again
    rig.ledger.close()
    assert rig.ledger.steps == 1 and rig.numbers() == [1]
    np.testing.assert_allclose(rig.submitted[0].grad_rows()[0], expected, rtol=1e-6)


def test_optimizer_hook_site_ends_a_closure_step_after_the_backward_inside_it():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rig = ledger_rig(model, optimizer=optimizer)  # no sampling: without a closure it would end before the update
    OptimizerHookSite(rig.ledger, rig.guard, optimizer)
    counted_during_backward: list[bool] = []
    seen: list[np.ndarray] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = backward(model, 7)
        rig.ledger.read_gradients()  # the end-of-backward read
        counted_during_backward.append(rig.ledger.counted() is not None)
        seen.append(_grad_norms(model))
        return loss

    optimizer.step(closure)
    rig.ledger.close()
    assert counted_during_backward == [True] and rig.ledger.steps == 1
    np.testing.assert_allclose(rig.submitted[0].grad_rows()[0], seen[0], rtol=1e-6)


def test_a_failure_while_completing_a_counted_step_costs_that_step_only(monkeypatch, caplog):
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rig = ledger_rig(model, optimizer=optimizer, histogram_every=1)  # every step measures the weights
    OptimizerHookSite(rig.ledger, rig.guard, optimizer)
    original = rig.watched.weight_parts
    calls = {"n": 0}

    def fails_at_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(rig.watched, "weight_parts", fails_at_step_2)
    grads = []
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        for step in range(1, 5):
            optimizer.zero_grad()
            backward(model, step)
            rig.ledger.read_gradients()
            grads.append(_grad_norms(model))
            optimizer.step()
        rig.ledger.close()
    assert rig.guard.errors == 1 and rig.ledger.steps == 4 and rig.numbers() == [1, 3, 4]
    assert [r.getMessage() for r in caplog.records if "out of order" in r.getMessage()] == []
    for record in rig.submitted:
        np.testing.assert_allclose(record.grad_rows()[0], grads[record.step_number - 1], rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["scaler", "fused-scaler"])
def test_scaler_site_counts_each_update_with_its_scales_loss_and_skip(fused: bool):
    model = linear_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    rig = ledger_rig(model, optimizer=optimizer, scaler=scaler)
    assert rig.reader.scaler is not None
    site = (FusedScalerSite if fused else ScalerSite)(rig.ledger, rig.guard, optimizer, rig.reader.scaler)
    inject = BackwardInjection(model[2].bias, (slice(0, 1),), [math.inf], {2})
    truth = []
    for step in range(1, 5):
        inject.step = step
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 4, generator=generator), torch.randn(6, 2, generator=generator)
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        rig.ledger.read_gradients()  # the end-of-backward read, of gradients still scaled by S
        before = scaler.get_scale()
        norms = _grad_norms(model, divide_by=before)
        scaler.step(optimizer)
        scaler.update()
        truth.append((loss.item(), before, scaler.get_scale(), norms))
        rig.ledger.seal_ended()
    rig.ledger.close()
    assert rig.ledger.steps == 4 and rig.numbers() == [1, 2, 3, 4] and rig.guard.errors == 0
    assert [t[2] / t[1] for t in truth] == [2.0, 0.5, 2.0, 2.0]  # the scaler grew, backed off, grew
    for record, (loss, before, after, norms) in zip(rig.submitted, truth, strict=True):
        assert record.skipped() == (record.step_number == 2)
        assert (record.host.scalar(records.LOSS_SCALE), record.host.scalar(records.NEW_LOSS_SCALE)) == (before, after)
        assert record.loss_value() == pytest.approx(loss, rel=1e-6)
        np.testing.assert_allclose(record.grad_rows()[0], norms, rtol=1e-6)
    # Without a fused step the host knows the skip (the optimizer's step did not run); with one, only the device.
    skipped = StepMeasurement(2)
    assert site.skip_known(skipped) is (None if fused else True)
    site.remove()
    assert "update" not in vars(scaler) and "scale" not in vars(scaler)


def test_framework_site_ends_only_a_step_whose_gradients_were_read():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rig = ledger_rig(model, optimizer=optimizer)
    site = FrameworkSite(rig.ledger, rig.guard, optimizer)
    site.finish_step()  # nothing read yet: no step
    assert rig.ledger.steps == 0 and rig.ledger.under_way is None
    backward(model, 3)
    expected = _grad_norms(model)
    rig.ledger.read_gradients()  # watcher.gradients_ready()
    optimizer.step()
    site.finish_step()
    assert rig.ledger.steps == 1 and rig.ledger.stage_of(1) is Stage.ENDED
    rig.ledger.close()
    np.testing.assert_allclose(rig.submitted[0].grad_rows()[0], expected, rtol=1e-6)


def test_step_call_site_counts_reads_and_ends_a_step_without_an_optimizer():
    model = linear_model()
    rig = ledger_rig(model, histogram_every=1)
    site = StepCallSite(rig.ledger, rig.guard, None)
    backward(model, 4)
    grads, weights = _grad_norms(model), float64_norms(list(model.parameters()))
    site.step()
    assert rig.ledger.steps == 1 and rig.ledger.stage_of(1) is Stage.ENDED
    rig.ledger.close()
    (record,) = rig.submitted
    assert record.lr == []
    np.testing.assert_allclose(record.grad_rows()[0], grads, rtol=1e-6)
    np.testing.assert_allclose(record.host.get(records.WEIGHT)[0], weights, rtol=1e-6)


def test_a_removed_optimizer_hook_site_counts_nothing():
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rig = ledger_rig(model, optimizer=optimizer)
    site = OptimizerHookSite(rig.ledger, rig.guard, optimizer)
    site.remove()
    backward(model, 1)
    optimizer.step()
    assert rig.ledger.steps == 0 and rig.submitted == []
