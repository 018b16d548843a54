"""What is measured at a step, on its own: the cadence, the watched parameters, one gradient reading and the
measurement's phases up to its record."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from numwatch import protocol
from numwatch.formats import format_spec
from numwatch.step import records
from numwatch.step.measurement import Cadence, Phase, StepMeasurement, WatchedTensors, select_parameters
from tests.support.ledger_rig import backward, float64_norms, linear_model

FP16_SMALLEST_NORMAL = 2.0**-14


def test_cadence_picks_the_first_step_and_every_nth_after_it():
    cadence = Cadence(histogram_every=3, format_every=2, quant_every=4)
    steps = range(1, 11)
    assert [s for s in steps if cadence.sampled(s)] == [1, 4, 7, 10]
    assert [s for s in steps if cadence.format_due(s)] == [1, 3, 5, 7, 9]
    assert [s for s in steps if cadence.quant_due(s)] == [4, 8]  # about trained weights: not step 1
    assert [s for s in steps if cadence.after_update(s)] == [1, 4, 7, 8, 10]
    off = Cadence(0, 0, 0)
    assert not any(off.sampled(s) or off.format_due(s) or off.quant_due(s) or off.after_update(s) for s in steps)


class _Compiled(nn.Module):
    """Names as torch.compile leaves them: the compiled module under ``_orig_mod``."""

    def __init__(self) -> None:
        super().__init__()
        self._orig_mod = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1))
        self._orig_mod[1].weight.requires_grad_(False)


def test_parameters_are_selected_by_compile_independent_names():
    model = _Compiled()
    assert [name for name, _ in select_parameters(model, None, None)] == [
        "0.weight",
        "0.bias",
        "1.bias",
        "2.weight",
        "2.bias",
    ]
    assert [name for name, _ in select_parameters(model, "*.weight", None)] == ["0.weight", "2.weight"]
    assert [name for name, _ in select_parameters(model, ["0.*", "2.*"], ["*.bias"])] == ["0.weight", "2.weight"]
    chosen = select_parameters(model, "2.weight", None)
    assert chosen[0][1] is model._orig_mod[2].weight


def _watched(model: nn.Module, histogram_every: int = 0, format_every: int = 0) -> WatchedTensors:
    return WatchedTensors(
        select_parameters(model, None, None), format_spec("fp16"), Cadence(histogram_every, format_every)
    )


def test_a_reading_covers_the_tensors_with_a_gradient_unscaled_by_the_multiplier():
    model = linear_model()
    watched = _watched(model)
    backward(model, 1)
    model[2].bias.grad = None
    scale = 2.0**7
    for p in model.parameters():  # as a GradScaler leaves them: g * S
        if p.grad is not None:
            p.grad.mul_(scale)
    reading = watched.read_gradients(1, torch.tensor(1 / scale), None)
    assert reading.present == [0, 1, 2]
    grads = [p.grad.double() / scale for p in list(model.parameters())[:3]]
    np.testing.assert_allclose(reading.norms[0].numpy(), float64_norms(grads), rtol=1e-6)
    np.testing.assert_allclose(reading.norms[1].numpy(), [float(g.abs().max()) for g in grads], rtol=1e-6)
    assert reading.parts == {}  # neither sampled nor a format step
    norms_after = watched.norms_now(reading, torch.tensor(1 / scale))  # as they are now, e.g. after a clip
    np.testing.assert_allclose(norms_after.numpy(), float64_norms(grads), rtol=1e-6)


def _literal_fp16_counts(x: torch.Tensor) -> list[int]:
    """zeros, underflow, subnormal, overflow of x as the cast to float16 decides them."""
    cast = x.to(torch.float16)
    return [
        int((x == 0).sum()),
        int(((x != 0) & (cast == 0)).sum()),
        int(((cast != 0) & (cast.abs() < FP16_SMALLEST_NORMAL)).sum()),
        int((torch.isfinite(x) & torch.isinf(cast)).sum()),
    ]


def test_a_format_step_counts_what_the_cast_to_the_format_does():
    model = nn.Linear(4, 2, bias=False)
    watched = _watched(model, format_every=2)
    model.weight.grad = torch.tensor([[0.0, 1e-9, 3e-6, 7e4], [-1e-9, 0.0, 1.0, -2e5]])
    expected = np.array(_literal_fp16_counts(model.weight.grad.reshape(-1)))
    assert expected.tolist() == [2, 2, 1, 2]
    counts = watched.read_gradients(1, None, None).parts[records.FORMAT]
    assert counts.shape == (len(protocol.FORMAT_COUNT_STATS), 1)
    np.testing.assert_array_equal(counts[:, 0].numpy(), expected)
    assert records.FORMAT not in watched.read_gradients(2, None, None).parts  # not a format step


def test_nan_and_inf_are_counted_per_tensor():
    model = linear_model()
    watched = _watched(model)
    backward(model, 2)
    model[0].weight.grad[0, :3] = math.nan
    model[2].weight.grad[1, 0] = -math.inf
    reading = watched.read_gradients(1, None, None)
    assert not reading.has_counts
    watched.count_nonfinite(reading)
    np.testing.assert_array_equal(reading.parts[records.NONFINITE].numpy(), [[3, 0, 0, 0], [0, 0, 1, 0]])
    assert math.isnan(float(reading.norms[0, 0])) and math.isinf(float(reading.norms[0, 2]))


def test_a_measurement_goes_open_read_and_a_failure_drops_everything():
    model = linear_model()
    watched = _watched(model, histogram_every=1)
    measurement = StepMeasurement(1)
    assert measurement.phase is Phase.OPEN and not measurement.started
    backward(model, 3)
    measurement.read(watched, None, None)
    assert measurement.phase is Phase.READ and measurement.started and measurement.snapshot is not None
    measurement.add_losses([torch.tensor(0.5)])
    measurement.log({"accuracy": 0.9})
    measurement.fail()
    assert measurement.failed and measurement.started
    assert (measurement.reading, measurement.snapshot, measurement.losses, measurement.logged) == (None, None, [], {})
    measurement.read(watched, None, None)  # whatever arrives until it ends is ignored
    measurement.add_losses([torch.tensor(1.0)])
    measurement.log({"loss": 1.0})
    assert (measurement.reading, measurement.losses, measurement.logged) == (None, [], {})


def test_a_later_read_replaces_the_earlier_one_and_the_record_sums_the_steps_losses():
    model = linear_model()
    watched = _watched(model)
    measurement = StepMeasurement(5)
    losses = [backward(model, 4)]
    measurement.read(watched, None, None)
    measurement.add_losses(losses[-1:])
    losses.append(backward(model, 5))  # the second micro-batch accumulates into .grad
    measurement.read(watched, None, None)
    measurement.add_losses(losses[-1:])
    measurement.lr = [0.1]
    measurement.log({"tokens": 512})
    measurement.clip_effect().norms.mul_(0.5)
    expected = float64_norms([p.grad for p in model.parameters()])
    record = measurement.finish(watched, step_time=0.25, module_parts=None)
    assert (record.step_number, record.step_time, record.lr, record.scalars) == (5, 0.25, [0.1], {"tokens": 512.0})
    assert record.loss_value() == pytest.approx(float(losses[0]) + float(losses[1]), rel=1e-6)
    np.testing.assert_allclose(record.grad_rows()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(record.host.get(records.POST_CLIP), expected / 2, rtol=1e-6)
    assert record.clip_coef() == pytest.approx(0.5, rel=1e-6)


def test_a_loss_logged_on_the_device_takes_precedence_over_the_backwards():
    model = linear_model()
    watched = _watched(model)
    measurement = StepMeasurement(1)
    measurement.add_losses([backward(model, 6)])
    measurement.read(watched, None, None)
    measurement.log({"loss": torch.tensor(3.25)})
    assert measurement.finish(watched, step_time=None, module_parts=None).loss_value() == 3.25
