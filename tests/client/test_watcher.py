"""Wiring of numwatch.watch on CPU: where and when the numbers are taken, and what they are."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import numwatch
from numwatch import protocol
from numwatch.kernels import stats
from tests.support.collector_docs import values
from tests.support.watch_helpers import BackwardInjection, batch, read_spool, reference_norms, small_model

INF_STEPS = {3, 4, 9}  # 1-based optimizer steps whose gradient gets an Inf


def _scaler_run(tmp_path, fused: bool, steps: int = 10) -> tuple[numwatch.Watcher, list[dict]]:
    """Train with a GradScaler, injecting Inf at INF_STEPS; return the scaler's own history
    and float64 reference norms of the unscaled gradients of every step."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    watcher = numwatch.watch(model, optimizer, scaler=scaler, run="amp", spool_dir=tmp_path, histogram_every=4)
    truth = []
    inject = BackwardInjection(model[2].bias, (slice(1, 2),), [math.inf], INF_STEPS)
    for step in range(1, steps + 1):
        inject.step = step
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = (out.float() - y).pow(2).mean()
        scaler.scale(loss).backward()
        scale_before = scaler.get_scale()
        scaled_grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        unscaled = [g / scale_before for g in scaled_grads]
        truth.append(
            {
                "loss": loss.item(),
                "before": scale_before,
                "after": scaler.get_scale(),
                "norms": reference_norms(unscaled),
            }
        )
        optimizer.zero_grad()
    watcher.close()
    return watcher, truth


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_scaler_history_skips_and_unscaled_norms(tmp_path, fused):
    watcher, truth = _scaler_run(tmp_path, fused)
    spooled = read_spool(watcher.spool_dir)
    assert [s["step"] for s in spooled.steps] == list(range(1, 11))
    assert [s["skipped"] for s in spooled.steps] == [i in INF_STEPS for i in range(1, 11)]
    assert [(s["loss_scale"], s["new_loss_scale"]) for s in spooled.steps] == [(t["before"], t["after"]) for t in truth]
    decisions = [s["scale_decision"] for s in spooled.steps]
    assert decisions == ["none", "growth", "backoff", "backoff", "none", "growth", "none", "growth", "backoff", "none"]
    for step, reference in zip(spooled.steps, truth, strict=True):
        assert step["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        norm, absmax = reference["norms"]
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), norm, rtol=1e-5)
        np.testing.assert_allclose(spooled.stat(step, "grad_absmax"), absmax, rtol=1e-6)
        if step["skipped"]:
            assert spooled.stat(step, "inf_count").tolist() == [0, 0, 0, 1]
            assert protocol.decode_float(step["global_grad_norm"]) == math.inf
        else:
            assert "inf_count" not in step["tensors"]  # counted only where a norm is not finite
            assert step["global_grad_norm"] == pytest.approx(math.sqrt(np.sum(norm**2)), rel=1e-5)
            expected_headroom = math.log2(torch.finfo(torch.float16).max / (reference["before"] * absmax.max()))
            assert step["headroom_bits"] == pytest.approx(expected_headroom, rel=1e-5)
    assert spooled.runs[0]["format"] == "fp16"
    assert spooled.events[0]["kind"] == "nonfinite_origin" and spooled.events[0]["step"] == 3
    assert spooled.events[0]["details"]["tensors"] == [{"name": "2.bias", "nan": 0, "inf": 1}]
    assert spooled.statuses[-1] == "finished"


def test_format_counts_follow_the_cast_at_the_loss_scale(tmp_path):
    model = nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    watcher = numwatch.watch(model, optimizer, scaler=scaler, run="fmt", spool_dir=tmp_path)
    tiny = torch.finfo(torch.float16).smallest_normal
    # grad = x (loss = w.x with w = 1): zero, an fp16 underflow even at S, a subnormal, a normal.
    x = torch.tensor([[0.0, tiny * 2.0**-22, tiny * 2.0**-12, 1.0]])
    with torch.no_grad():
        model.weight.fill_(1.0)
    scaler.scale(model(x).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    watcher.close()
    step = read_spool(watcher.spool_dir).steps[0]
    spooled = read_spool(watcher.spool_dir)
    counts = {name: int(spooled.stat(step, name)[0]) for name in protocol.FORMAT_COUNT_STATS}
    assert counts == {"zeros": 1, "underflow": 1, "subnormal": 1, "overflow": 0}


def test_one_record_per_optimizer_step_with_accumulation(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    watcher = numwatch.watch(model, optimizer, run="accum", spool_dir=tmp_path, histogram_every=2)
    seen = []
    # Registered after the watcher's hook: sees the same gradients, just later.
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.clone() for p in model.parameters()])
    )
    losses = []
    for step in range(1, 4):
        total = 0.0
        for micro in range(4):
            x, y = batch(10 * step + micro)
            loss = (model(x) - y).pow(2).mean() / 4
            loss.backward()
            total += loss.item()
        watcher.log(loss=total, tokens=128.0 * step)
        losses.append(total)
        optimizer.step()
        optimizer.zero_grad()
        optimizer.param_groups[0]["lr"] *= 0.5
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [s["step"] for s in spooled.steps] == [1, 2, 3]
    for step, grads, loss in zip(spooled.steps, seen, losses, strict=True):
        norm, absmax = reference_norms(grads)
        np.testing.assert_allclose(spooled.stat(step, "grad_norm"), norm, rtol=1e-5)
        np.testing.assert_allclose(spooled.stat(step, "grad_absmax"), absmax, rtol=1e-6)
        assert step["global_grad_norm"] == pytest.approx(math.sqrt(np.sum(norm**2)), rel=1e-5)
        assert step["loss"] == loss and step["skipped"] is False and step["loss_scale"] is None
        assert step["scalars"] == {"tokens": 128.0 * step["step"]}
    assert [s["lr"] for s in spooled.steps] == [[0.1], [0.05], [0.025]]
    assert spooled.steps[0]["step_time"] is None and spooled.steps[1]["step_time"] > 0
    assert spooled.runs[0]["format"] == "fp32"
    # Sampled steps 1 and 3: both histogram kinds, weight and update statistics.
    assert [(h["step"], h["kind"]) for h in spooled.histograms] == [
        (1, "grad"),
        (1, "weight"),
        (3, "grad"),
        (3, "weight"),
    ]
    assert {"weight_norm", "update_ratio", "stale_fraction"} <= set(spooled.steps[2]["tensors"])
    assert "weight_norm" not in spooled.steps[1]["tensors"]


def test_update_ratio_matches_the_applied_step(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    watcher = numwatch.watch(model, optimizer, run="upd", spool_dir=tmp_path, histogram_every=1)
    before = [p.detach().clone().double() for p in model.parameters()]
    x, y = batch(0)
    (model(x) - y).pow(2).mean().backward()
    optimizer.step()
    after = [p.detach().double() for p in model.parameters()]
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    expected = [float((a - b).norm() / b.norm()) for a, b in zip(after, before, strict=True)]
    np.testing.assert_allclose(spooled.stat(spooled.steps[0], "update_ratio"), expected, rtol=1e-4)
    weight_norms = [float(a.norm()) for a in after]
    np.testing.assert_allclose(spooled.stat(spooled.steps[0], "weight_norm"), weight_norms, rtol=1e-5)


def test_manual_step_and_missing_gradients(tmp_path):
    model = small_model()
    watcher = numwatch.watch(model, run="manual", spool_dir=tmp_path, histogram_every=1)
    x, y = batch(0)
    (model[0](x).sum()).backward()  # only the first layer gets gradients
    watcher.step()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    norms = spooled.stat(spooled.steps[0], "grad_norm")
    reference, _ = reference_norms([model[0].weight.grad, model[0].bias.grad])
    np.testing.assert_allclose(norms[:2], reference, rtol=1e-5)
    assert norms[2:].tolist() == [0.0, 0.0]
    assert spooled.steps[0]["lr"] == []


def test_include_exclude_choose_tensors(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(
        model, optimizer, run="sel", spool_dir=tmp_path, include=["*.weight", "2.*"], exclude=["2.bias"]
    )
    assert watcher.tensor_names == ["0.weight", "2.weight"]
    x, y = batch(0)
    (model(x) - y).pow(2).mean().backward()
    optimizer.step()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert [t["name"] for t in spooled.runs[0]["tensors"]] == ["0.weight", "2.weight"]
    reference, _ = reference_norms([model[0].weight.grad, model[2].weight.grad])
    np.testing.assert_allclose(spooled.stat(spooled.steps[0], "grad_norm"), reference, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to watch"):
        numwatch.watch(model, optimizer, run="none", spool_dir=tmp_path, include=["nope*"])


def _train(model, optimizer, scaler, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        loss = (model(x) - y).pow(2).mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = math.nan
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()


def _fresh(seed: int = 0):
    model = small_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)


def test_watched_run_is_bit_identical_and_close_removes_everything(tmp_path):
    plain_model, plain_optimizer, plain_scaler = _fresh()
    _train(plain_model, plain_optimizer, plain_scaler, range(1, 7))

    model, optimizer, scaler = _fresh()
    watcher = numwatch.watch(
        model,
        optimizer,
        scaler=scaler,
        run="same",
        spool_dir=tmp_path,
        histogram_every=1,
        trace_activations=True,
        on_nonfinite="ignore",
    )
    with pytest.raises(RuntimeError, match="already watched"):
        numwatch.watch(model, optimizer, scaler=scaler, run="again", spool_dir=tmp_path)
    _train(model, optimizer, scaler, range(1, 4))
    watcher.close()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert all(not m._forward_hooks for m in model.modules())
    assert "update" not in vars(scaler) and "scale" not in vars(scaler)
    _train(model, optimizer, scaler, range(4, 7))  # the rest of the run unwatched

    for watched, plain in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(watched, plain)
    assert scaler.state_dict() == plain_scaler.state_dict()
    assert len(read_spool(watcher.spool_dir).steps) == 3
    numwatch.watch(model, optimizer, scaler=scaler, run="after-close", spool_dir=tmp_path).close()


def test_raise_names_the_tensor_at_the_step(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="raise", spool_dir=tmp_path, on_nonfinite="raise")
    inject = BackwardInjection(model[2].weight, (0, slice(0, 2)), [math.nan, math.inf], {2})
    for step in range(1, 3):
        inject.step = step
        x, y = batch(step)
        (model(x) - y).pow(2).mean().backward()
        if step == 2:
            before = model[2].weight.detach().clone()
            with pytest.raises(numwatch.NonFiniteError, match=r"step 2 .*2\.weight \(nan=1, inf=1\)"):
                optimizer.step()
            assert torch.equal(model[2].weight, before)  # raised before the update
        else:
            optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    assert [s["step"] for s in read_spool(watcher.spool_dir).steps] == [1, 2]


def test_warnings_are_rate_limited(tmp_path, caplog):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    watcher = numwatch.watch(model, optimizer, run="warn", spool_dir=tmp_path)
    BackwardInjection(model[0].bias, (slice(3, 4),), [math.inf])
    with caplog.at_level(logging.WARNING, logger="numwatch"):
        for step in range(1, 7):
            x, y = batch(step)
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                model[0].bias[3] = 0.0  # lr * inf made it NaN; keep the same warning each step
        watcher.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "numwatch"]
    assert len(lines) == 2
    assert "step 1" in lines[0] and "0.bias (nan=0, inf=1)" in lines[0]
    assert "repeated 5 more times" in lines[1]
    assert len(read_spool(watcher.spool_dir).events) == 1  # nonfinite_origin only once


class _Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def test_activation_tracing_names_the_first_nonfinite_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), _Sqrt(), nn.Linear(4, 2), nn.ReLU())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(
        model, optimizer, run="trace", spool_dir=tmp_path, trace_activations=True, on_nonfinite="ignore"
    )
    x = torch.randn(16, 4)
    with torch.no_grad():
        expected = float(model[0](x).abs().max())
    model(x).sum().backward()  # tanh output < 0 somewhere: sqrt gives NaN from module "2" on
    optimizer.step()
    watcher.close()
    spooled = read_spool(watcher.spool_dir)
    assert spooled.runs[0]["modules"] == ["0", "1", "2", "3", "4"]
    (event,) = spooled.events
    assert event["kind"] == "nonfinite_origin" and event["details"]["module"] == "2"
    assert event["details"]["tensors"][0]["name"] == "0.weight" and event["details"]["tensors"][0]["nan"] > 0
    activations = spooled.steps[0]["activations"]
    nonfinite = values(activations["nonfinite"], "<i8", 5).tolist()
    absmax = values(activations["absmax"], "<f4", 5).tolist()
    assert nonfinite == [0, 0, 1, 1, 1]
    assert absmax[0] == pytest.approx(expected, rel=1e-6)


def test_monitoring_failure_never_breaks_training(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(stats, "grad_norms", broken)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="broken", spool_dir=tmp_path)
    with caplog.at_level(logging.ERROR, logger="numwatch"):
        for step in range(1, 4):
            x, y = batch(step)
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    assert watcher.monitoring_errors == 3 and watcher.steps == 3
    assert sum("monitoring failed" in r.getMessage() for r in caplog.records) == 1


def test_crash_in_with_block_marks_the_run_crashed(tmp_path):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyError):
        with numwatch.watch(model, optimizer, run="crash", spool_dir=tmp_path) as watcher:
            x, y = batch(0)
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
            raise KeyError("user code failed")
    spooled = read_spool(watcher.spool_dir)
    assert spooled.statuses[-1] == "crashed" and len(spooled.steps) == 1


def test_unclosed_watcher_is_flushed_at_interpreter_exit(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch, numwatch
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        watcher = numwatch.watch(model, optimizer, run="exit", spool_dir={str(tmp_path)!r})
        for _ in range(3):
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (directory,) = tmp_path.glob("exit.*/rank0")
    spooled = read_spool(directory)
    assert [s["step"] for s in spooled.steps] == [1, 2, 3] and spooled.statuses[-1] == "finished"


def test_tensors_outside_any_param_group_reach_the_collector(collector, tmp_path):
    """A frozen-by-the-optimizer tensor and a watcher without an optimizer register their runs
    (tensor group -1) instead of being refused and losing every step."""
    url = collector()
    trained, outside = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(trained, outside)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    with numwatch.watch(model, optimizer, run="partial-optimizer", url=url, spool_dir=tmp_path / "a"):
        for _ in range(3):
            model(torch.ones(4, 3)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    manual = torch.nn.Linear(3, 1)
    with numwatch.watch(manual, run="no-optimizer", url=url, spool_dir=tmp_path / "b") as watcher:
        for _ in range(2):
            manual(torch.ones(4, 3)).sum().backward()
            watcher.step()
            manual.zero_grad()
    runs = {run["run"]: run for run in httpx.get(f"{url}/api/v1/runs").json()}
    assert (runs["partial-optimizer"]["last_step"], runs["no-optimizer"]["last_step"]) == (3, 2)
    groups = [t["group"] for t in httpx.get(f"{url}/api/v1/runs/partial-optimizer").json()["tensors"]]
    assert groups == [0, 0, protocol.NO_PARAM_GROUP, protocol.NO_PARAM_GROUP]
