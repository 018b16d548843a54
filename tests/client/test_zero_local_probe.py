"""The DeepSpeed local-gradient probe on its own: what each parameter's hook measures, against float64.

The spawned ZeRO runs (``test_deepspeed.py``) check it against each rank's reference gradient;
here the gradients are built so the answer is known: chosen NaN/Inf positions, a loss scale,
a second backward within one step, and a step without any.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from numwatch.capture.guard import Guard
from numwatch.capture.local_grads import LOCAL_CHECKSUM, LOCAL_NONFINITE, LOCAL_NORMS, ZeroLocalProbe
from numwatch.kernels.replica import bit_sum


class Scaled(torch.nn.Module):
    """loss = S · Σ c_i · p_i: each gradient is S · c, whatever c holds."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
        self.b = torch.nn.Parameter(torch.ones(3, 2))

    def forward(self, ca: torch.Tensor, cb: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * ((self.a * ca).sum().float() + (self.b * cb).sum())


def _probe(model: torch.nn.Module, scale: float, sampled: bool, replicated: bool) -> ZeroLocalProbe:
    guard = Guard(lambda: pytest.fail("the probe failed"))
    return ZeroLocalProbe(model, lambda: scale, lambda: sampled, guard, replicated=replicated)


def test_norms_are_unscaled_and_nan_inf_elements_counted_exactly() -> None:
    model = Scaled()
    probe = _probe(model, 1024.0, sampled=True, replicated=True)
    ca = torch.tensor([1.0, math.inf, math.nan, 2.0, -math.inf], dtype=torch.bfloat16)
    cb = torch.arange(6.0).reshape(3, 2) - 2.5
    model(ca, cb, 1024.0).backward()
    step = probe.take()
    assert step is not None
    assert sorted(step.meta.names) == ["a", "b"]  # in the order autograd reaches them
    norms = dict(zip(step.meta.names, step.parts[LOCAL_NORMS].tolist(), strict=True))
    assert math.isnan(norms["a"])
    assert norms["b"] == pytest.approx(float(np.linalg.norm(cb.double().numpy())), rel=1e-6)
    assert int(step.parts[LOCAL_NONFINITE]) == 3
    assert step.parts[LOCAL_NONFINITE].dtype == torch.int64
    assert int(step.parts[LOCAL_CHECKSUM]) == int(bit_sum([model.a, model.b]))
    assert step.meta.compute_time() is None  # not measured under ZeRO
    assert probe.take() is None  # nothing since


def test_the_last_backward_of_a_step_gives_the_norms_and_every_backward_its_nan_inf() -> None:
    model = Scaled()
    probe = _probe(model, 1.0, sampled=False, replicated=False)
    bad = torch.tensor([math.nan, 0.0, 0.0, 0.0, 0.0], dtype=torch.bfloat16)
    model(bad, torch.ones(3, 2), 1.0).backward()
    model.zero_grad()
    ca = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.bfloat16)
    model(ca, torch.zeros(3, 2), 1.0).backward()
    step = probe.take()
    assert step is not None
    norms = dict(zip(step.meta.names, step.parts[LOCAL_NORMS].tolist(), strict=True))
    assert norms == {"a": 5.0, "b": 0.0}
    assert int(step.parts[LOCAL_NONFINITE]) == 1  # the first backward's NaN is not hidden
    assert LOCAL_CHECKSUM not in step.parts  # not sampled; stage 3 holds no whole weight anyway
    probe.remove()
    model(ca, torch.zeros(3, 2), 1.0).backward()
    assert probe.take() is None


class _Accumulation:
    """ZeRO-1's accumulation as the probe sees it: the rank's own sum kept in ``.grad``."""

    def __init__(self) -> None:
        self.at_boundary = False

    def boundary(self, parameter: torch.Tensor) -> bool:
        return self.at_boundary

    def held(self, parameter: torch.Tensor) -> torch.Tensor | None:
        return parameter.grad


def test_with_accumulation_the_boundary_measures_the_sum_of_every_micro_batch() -> None:
    model = Scaled()
    accumulation = _Accumulation()
    guard = Guard(lambda: pytest.fail("the probe failed"))
    probe = ZeroLocalProbe(model, lambda: 8.0, lambda: False, guard, replicated=False, accumulated=accumulation)
    first = (torch.tensor([1.0, 2.0, 0.0, 0.0, math.inf], dtype=torch.bfloat16), torch.ones(3, 2))
    second = (torch.tensor([2.0, -2.0, 1.0, 0.0, 0.0], dtype=torch.bfloat16), torch.full((3, 2), 2.0))
    model(*first, 8.0).backward()  # not the boundary: only accumulated into .grad
    assert probe.take() is None
    accumulation.at_boundary = True
    model(*second, 8.0).backward()
    step = probe.take()
    assert step is not None
    norms = dict(zip(step.meta.names, step.parts[LOCAL_NORMS].tolist(), strict=True))
    assert math.isinf(norms["a"])  # the first micro-batch's Inf is in the sum
    assert norms["b"] == pytest.approx(3.0 * math.sqrt(6.0), rel=1e-6)  # (1 + 2) · 8 / 8 per element
    assert int(step.parts[LOCAL_NONFINITE]) == 1
