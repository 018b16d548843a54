"""The clip observer on its own: what torch's clip functions did to the watched gradients of the step under way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.utils.clip_grad as clip_grad
from torch import nn

from numwatch.capture.clipping import NORM_EPSILON, ClipEffect, ClipObserver
from numwatch.step.ledger import StepLedger
from tests.support.ledger_rig import LedgerRig, backward, float64_norms, ledger_rig, linear_model

MAX_NORM = 0.05


@pytest.fixture
def observed() -> Iterator[Callable[[nn.Module], tuple[LedgerRig, ClipObserver]]]:
    """A ledger around a model with a clip observer reporting to it; the observers go at the end."""
    observers: list[ClipObserver] = []

    def make(model: nn.Module) -> tuple[LedgerRig, ClipObserver]:
        rig = ledger_rig(model)
        observer = ClipObserver(rig.watched.parameters, rig.ledger, rig.guard)
        observers.append(observer)
        return rig, observer

    originals = (clip_grad._clip_grads_with_norm_, clip_grad.clip_grad_value_, torch.nn.utils.clip_grad_value_)
    yield make
    for observer in observers:
        observer.remove()
    # The last listener gone, torch's own functions are back.
    assert (clip_grad._clip_grads_with_norm_, clip_grad.clip_grad_value_, torch.nn.utils.clip_grad_value_) == originals


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


def test_norm_clip_scales_each_tensors_norm_by_torchs_coefficient(observed):
    model = linear_model()
    rig, _ = observed(model)
    backward(model, 1)
    rig.ledger.read_gradients()
    before = float64_norms(_grads(model))
    total = math.sqrt(float(np.sum(before**2)))
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    assert float(returned) == pytest.approx(total, rel=1e-6)  # torch's own pre-clip norm
    coefficient = MAX_NORM / (total + NORM_EPSILON)
    assert coefficient < 0.5  # the clip did change the gradients
    after = float64_norms(_grads(model))
    np.testing.assert_allclose(after, before * coefficient, rtol=1e-5)
    np.testing.assert_allclose(rig.ledger.clip_effect().norms.double().numpy(), after, rtol=1e-5)
    rig.ledger.count_step()
    rig.ledger.end_step(skip_known=None)
    rig.ledger.close()
    (record,) = rig.submitted
    assert record.clip_coef() == pytest.approx(coefficient, rel=1e-5)
    assert record.post_clip_grad_norm() == pytest.approx(MAX_NORM, rel=1e-5)


def test_value_clip_measures_the_norms_after_the_clamp(observed):
    model = linear_model()
    rig, _ = observed(model)
    backward(model, 2)
    rig.ledger.read_gradients()
    before = float64_norms(_grads(model))
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
    after = float64_norms(_grads(model))
    assert np.all(after < before)
    np.testing.assert_allclose(rig.ledger.clip_effect().norms.double().numpy(), after, rtol=1e-6)


def test_tensors_without_a_gradient_keep_their_columns(observed):
    model = linear_model()
    rig, _ = observed(model)
    backward(model, 3)
    model[0].bias.grad = None  # no gradient this step: the reading covers the other three
    rig.ledger.read_gradients()
    assert rig.ledger.gradient_columns() == [0, 2, 3]
    before = float64_norms(_grads(model))
    torch.nn.utils.clip_grad_norm_([model[2].weight], 1e-3)  # clips the third column only
    effect = rig.ledger.clip_effect().norms.double().numpy()
    np.testing.assert_allclose(effect[[0, 2]], before[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(effect[1], float64_norms([model[2].weight.grad])[0], rtol=1e-5)
    assert effect[1] == pytest.approx(1e-3, rel=1e-4)


def test_clips_of_other_gradients_or_before_any_read_change_nothing(observed):
    model, other = linear_model(0), linear_model(1)
    rig, _ = observed(model)
    backward(model, 4)
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)  # nothing read yet: nothing to follow
    assert rig.ledger.under_way is None
    rig.ledger.read_gradients()
    backward(other, 4)
    torch.nn.utils.clip_grad_norm_(other.parameters(), MAX_NORM)
    torch.nn.utils.clip_grad_value_(other.parameters(), 1e-4)
    assert rig.ledger.under_way is not None and rig.ledger.under_way.clip is None


class _Spy:
    """A clip target that delegates to the ledger and notes the gradients' norms when warned of a clip."""

    def __init__(self, ledger: StepLedger, model: nn.Module) -> None:
        self.ledger, self.model = ledger, model
        self.warned_at: list[np.ndarray] = []

    def gradient_columns(self) -> list[int] | None:
        return self.ledger.gradient_columns()

    def before_clip(self) -> None:
        self.warned_at.append(float64_norms(_grads(self.model)))
        self.ledger.before_clip()

    def clip_effect(self) -> ClipEffect:
        return self.ledger.clip_effect()

    def norms_now(self) -> torch.Tensor:
        return self.ledger.norms_now()


def test_the_target_is_warned_before_the_gradients_are_rewritten():
    model = linear_model()
    rig = ledger_rig(model)
    spy = _Spy(rig.ledger, model)
    observer = ClipObserver(rig.watched.parameters, spy, rig.guard)
    try:
        backward(model, 5)
        rig.ledger.read_gradients()
        before = float64_norms(_grads(model))
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)
    finally:
        observer.remove()
    first, second = spy.warned_at
    np.testing.assert_array_equal(first, before)  # untouched when the first clip warned
    assert np.all(second < first)  # the value clip was warned of after the norm clip ran


def test_a_failing_target_costs_the_step_not_the_clip():
    model = linear_model()
    rig = ledger_rig(model)

    class Broken(_Spy):
        def clip_effect(self) -> ClipEffect:
            raise RuntimeError("injected")

    observer = ClipObserver(rig.watched.parameters, Broken(rig.ledger, model), rig.guard)
    try:
        backward(model, 6)
        rig.ledger.read_gradients()
        total = math.sqrt(float(np.sum(float64_norms(_grads(model)) ** 2)))
        returned = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        after = math.sqrt(float(np.sum(float64_norms(_grads(model)) ** 2)))
    finally:
        observer.remove()
    assert float(returned) == pytest.approx(total, rel=1e-6) and after == pytest.approx(MAX_NORM, rel=1e-5)
    assert rig.guard.errors == 1 and rig.ledger.under_way is not None and rig.ledger.under_way.failed
