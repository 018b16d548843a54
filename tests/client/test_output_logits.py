"""Output-logit log Z against a float64 reference, and where the logits are found in a model's output."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from numwatch.capture.output_logits import LogZ, find_logits

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")


def reference(*batches: torch.Tensor) -> tuple[float, float, float]:
    """mean and max over tokens of log(sum(exp(x))) over the vocabulary, and max |x|, in float64."""
    rows = np.concatenate([b.detach().double().reshape(-1, b.size(-1)).numpy() for b in batches])
    shift = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - shift).sum(axis=1)) + shift[:, 0]
    return float(log_z.mean()), float(log_z.max()), float(np.abs(rows).max())


def logits(*shape: int, seed: int, spread: float = 4.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * spread + 3.0).to(dtype)


@pytest.mark.parametrize("chunk", [50, 1 << 22])
def test_against_float64_reference(chunk):
    x = logits(3, 17, 40, seed=1)
    stats = LogZ(chunk)
    stats.add(x)
    np.testing.assert_allclose(stats.take_step().numpy(), reference(x), rtol=1e-6)
    assert stats.take_step() is None  # reset


def test_micro_batches_of_one_step_combine_by_token():
    a, b = logits(2, 5, 30, seed=2), logits(1, 9, 30, seed=3, spread=10.0)
    stats = LogZ(64)
    stats.add(a)
    stats.add(b)
    np.testing.assert_allclose(stats.take_step().numpy(), reference(a, b), rtol=1e-6)


def test_half_precision_logits_are_summed_in_float32_without_overflow():
    x = logits(4, 8, 1000, seed=4, spread=20.0, dtype=torch.bfloat16)  # exp() of these overflows bf16 and fp16
    stats = LogZ()
    stats.add(x)
    result = stats.take_step()
    assert result.dtype == torch.float32 and torch.isfinite(result).all()
    np.testing.assert_allclose(result.numpy(), reference(x), rtol=1e-5)


def test_a_nan_logit_makes_every_statistic_nan():
    x = logits(2, 4, 10, seed=5)
    x[1, 2, 3] = math.nan
    stats = LogZ(20)
    stats.add(x)
    assert torch.isnan(stats.take_step()).all()


def test_known_answer():
    x = torch.zeros(2, 3, 4)  # log Z = log 4 for every token
    x[1, 2] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # log Z ~ 100
    stats = LogZ()
    stats.add(x)
    mean, largest, absmax = stats.take_step().tolist()
    assert largest == pytest.approx(100.0, abs=1e-4) and absmax == 100.0
    assert mean == pytest.approx((5 * math.log(4) + 100.0) / 6, rel=1e-6)


def test_find_logits():
    x = torch.randn(2, 3, 5)
    loss = torch.tensor(1.0)
    assert find_logits(x) is x
    assert find_logits((x, loss)) is x
    assert find_logits(OrderedDict(loss=loss, logits=x)) is x  # ModelOutput is an OrderedDict

    class Output:
        logits = x

    assert find_logits(Output()) is x
    assert find_logits((loss, x)) is None  # a tuple's first element only
    assert find_logits(torch.randn(4, 1)) is None  # one output: not a distribution
    assert find_logits(torch.ones(3, 4, dtype=torch.long)) is None
    assert find_logits({"hidden": x}) is None
