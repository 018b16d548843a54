"""The GradScaler adapter on its own: what it reads of a real CPU GradScaler's per-step state, and its patches."""

from __future__ import annotations

import math

import pytest
import torch

from numwatch.capture.scaler import ScalerAdapter
from tests.support.ledger_rig import linear_model, loss_of

SCALE = 2.0**10


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler, ScalerAdapter]:
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)
    return model, optimizer, scaler, ScalerAdapter(scaler)


def test_before_the_first_scale_nothing_is_known_and_reading_creates_no_state():
    model, optimizer, scaler, adapter = _setup()
    assert adapter.scale() is None and adapter.scaling(optimizer) == (None, None)
    assert not adapter.unscaled(optimizer)
    assert adapter.found_inf(optimizer, torch.device("cpu")) is None
    assert dict(scaler._per_optimizer_states) == {}  # the states are a defaultdict: reading must not add to it


def test_scaling_follows_the_optimizers_stage_through_unscale_step_and_update():
    model, optimizer, scaler, adapter = _setup()
    scaler.scale(loss_of(model, 1)).backward()
    assert float(adapter.scale()) == SCALE
    # READY (torch makes the state at unscale_): .grad holds g*S, read times 1/S (exactly: S is a power of two).
    assert not adapter.unscaled(optimizer)
    multiplier, format_multiplier = adapter.scaling(optimizer)
    assert float(multiplier) == 1 / SCALE and format_multiplier is None
    scaler.unscale_(optimizer)
    # UNSCALED: .grad holds g; the format counts are about g*S; no Inf was found.
    assert adapter.unscaled(optimizer)
    multiplier, format_multiplier = adapter.scaling(optimizer)
    assert multiplier is None and float(format_multiplier) == SCALE
    assert float(adapter.found_inf(optimizer, torch.device("cpu"))) == 0.0
    scaler.step(optimizer)
    assert adapter.unscaled(optimizer)  # STEPPED: still unscaled
    scaler.update()
    assert float(adapter.scale()) == 2 * SCALE  # grown (growth_interval=1)
    assert not adapter.unscaled(optimizer)  # update() reset the state
    assert adapter.scaling(optimizer)[1] is None


def test_found_inf_sums_the_flags_unscale_left():
    model, optimizer, scaler, adapter = _setup()
    scaler.scale(loss_of(model, 2)).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    scaler.unscale_(optimizer)
    assert float(adapter.found_inf(optimizer, torch.device("cpu"))) == 1.0
    scaler.step(optimizer)  # skipped
    scaler.update()
    assert float(adapter.scale()) == SCALE / 2  # backed off


def _amp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    optimizer.zero_grad()
    scaler.scale(loss_of(model, 3)).backward()
    scaler.step(optimizer)
    scaler.update()


def test_patches_wrap_the_instance_and_restore_the_class_methods():
    model, optimizer, scaler, adapter = _setup()
    calls: list[str] = []

    def counting(original):
        def update(*args, **kwargs):
            calls.append("update")
            return original(*args, **kwargs)

        return update

    adapter.patch("update", counting)
    with pytest.raises(RuntimeError, match="already patched"):
        ScalerAdapter(scaler)  # a second watcher on the same scaler
    _amp_step(model, optimizer, scaler)
    assert calls == ["update"] and float(adapter.scale()) == 2 * SCALE  # the original update ran
    adapter.restore()
    assert "update" not in vars(scaler)
    _amp_step(model, optimizer, scaler)
    assert calls == ["update"] and float(adapter.scale()) == 4 * SCALE
    ScalerAdapter(scaler)  # free again
