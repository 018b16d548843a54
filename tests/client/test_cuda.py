"""On a CUDA device: the watcher's measurements never synchronize the host with the GPU, and
its numbers equal a float64 reference (also through fp16 autocast and a GradScaler).

Skipped without CUDA (CI has no GPU); on a GPU machine ``python benchmarks/gpu_check.py`` runs it
with the other GPU checks (docs/gpu.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import numwatch
from tests.support.watch_helpers import BackwardInjection, read_spool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda()


def _inputs(step: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(step)
    return torch.randn(32, 64, device="cuda", generator=generator)


def _reference_norms(model: nn.Module, divide_by: float = 1.0) -> np.ndarray:
    """float64 per-tensor gradient norms, computed on the host independently of numwatch.kernels.stats."""
    return np.array(
        [np.linalg.norm(p.grad.detach().double().cpu().numpy().ravel()) / divide_by for p in model.parameters()]
    )


def test_measuring_a_step_never_synchronizes_and_matches_float64(tmp_path) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    watcher = numwatch.watch(
        model, optimizer, run="cuda-fp32", spool_dir=tmp_path, format_every=2, histogram_every=3, format="bf16"
    )
    references = []
    for step in range(1, STEPS + 1):
        inputs = _inputs(step)
        # The watcher reads the gradients when the backward ends and ends the step in
        # optimizer.step(): any host-device synchronization there (an .item(), a blocking
        # copy, nonzero, ...) raises in this mode.
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(inputs).pow(2).mean().backward()
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        references.append(_reference_norms(model))  # SGD leaves .grad as the backward made it
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [s["step"] for s in spooled.steps] == list(range(1, STEPS + 1))
    for step, reference in zip(spooled.steps, references, strict=True):
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), reference, rtol=1e-5)
    assert any("underflow" in step["tensors"] for step in spooled.steps) and spooled.histograms


def test_fp16_autocast_with_grad_scaler_reports_unscaled_norms(tmp_path) -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    watcher = numwatch.watch(model, optimizer, scaler=scaler, run="cuda-fp16", spool_dir=tmp_path)
    references, scales = [], []
    for step in range(1, STEPS + 1):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(_inputs(step)).pow(2).mean()
        scaler.scale(loss).backward()
        scales.append(scaler.get_scale())
        references.append(_reference_norms(model, divide_by=scales[-1]))  # gradients are still scaled here
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [s["loss_scale"] for s in spooled.steps] == scales
    for step, reference in zip(spooled.steps, references, strict=True):
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), reference, rtol=1e-5)


def _nan_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, equal_nan=True)


def test_non_finite_gradients_are_flagged_every_step_and_counted_soon_after(tmp_path) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    watcher = numwatch.watch(
        model, optimizer, run="cuda-nan", spool_dir=tmp_path, on_nonfinite="ignore", histogram_every=0
    )
    first_bad = 4
    references = []
    inject = BackwardInjection(
        model[0].weight, (0, slice(0, 3)), [float("nan"), float("inf"), float("-inf")], {first_bad}
    )
    for step in range(1, 13):
        inject.step = step
        model(_inputs(step)).pow(2).mean().backward()
        references.append(
            [
                (np.linalg.norm(g), np.abs(g).max(), np.isnan(g).sum(), np.isinf(g).sum())
                for g in (p.grad.detach().double().cpu().numpy().ravel() for p in model.parameters())
            ]
        )
        optimizer.step()  # NaN weights from here on: every later gradient is NaN
        optimizer.zero_grad()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    counted = []
    for step, reference in zip(spooled.steps, references, strict=True):
        norms, absmax, nans, infs = (np.array(column) for column in zip(*reference, strict=True))
        _nan_equal(spooled.stat(step, "grad_norm"), norms)
        _nan_equal(spooled.stat(step, "grad_absmax"), absmax)
        if "nan_count" in step["tensors"]:
            counted.append(step["step"])
            np.testing.assert_array_equal(spooled.stat(step, "nan_count"), nans)
            np.testing.assert_array_equal(spooled.stat(step, "inf_count"), infs)
    assert not any(s < first_bad for s in counted)
    assert set(range(first_bad + 2, 13)) <= set(counted)  # counted again once the host saw the non-finite step
