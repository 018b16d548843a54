"""Accelerate: ``numwatch.watch(model, optimizer)`` on the objects ``accelerator.prepare`` returned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

accelerate = pytest.importorskip("accelerate")

import numwatch  # noqa: E402
from tests.support.watch_helpers import reference_norms, run_spool, small_model  # noqa: E402

ACCUMULATION = 2
BATCHES = 8


def _prepared():
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(BATCHES * 4, 6, generator=generator), torch.randn(BATCHES * 4, 3, generator=generator)
    )
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(data, batch_size=4))
    return accelerator, model, optimizer, loader


def _train(tmp_path, run: str, clip: float | None):
    accelerator, model, optimizer, loader = _prepared()
    watcher = numwatch.watch(model, optimizer, run=run, spool_dir=tmp_path)  # the one line
    expected, clip_norms = [], []
    for inputs, targets in loader:
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.mse_loss(model(inputs), targets))
            if accelerator.sync_gradients:
                expected.append(reference_norms([p.grad for p in model.parameters()])[0])
                if clip is not None:
                    watcher.gradients_ready()  # before clipping: the norms clip_grad_norm_ sees
                    clip_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    return run_spool(tmp_path, run), expected, clip_norms


def test_one_record_per_synchronised_step_with_the_accumulated_gradients(tmp_path):
    spooled, expected, _ = _train(tmp_path, "accelerate", clip=None)
    assert len(spooled.steps) == BATCHES // ACCUMULATION == len(expected)
    assert spooled.runs[0]["config"]["optimizer"] == "AdamW"  # the torch optimizer inside the wrapper
    for step, norms in zip(spooled.steps, expected, strict=True):
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), norms, rtol=1e-6)
        assert step["lr"] == [pytest.approx(1e-2)]


def test_gradients_ready_before_clipping_records_what_clip_grad_norm_saw(tmp_path):
    spooled, expected, clip_norms = _train(tmp_path, "clipped", clip=0.01)
    assert len(spooled.steps) == BATCHES // ACCUMULATION == len(clip_norms)
    for step, norms, clip_norm in zip(spooled.steps, expected, clip_norms, strict=True):
        assert clip_norm > 0.01
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), norms, rtol=1e-6)
        assert step["global_grad_norm"] == pytest.approx(clip_norm, rel=1e-5)
