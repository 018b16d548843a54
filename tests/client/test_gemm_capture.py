"""The matmul operands numwatch.watch measures on sampled steps (X, W, dY of every F.linear whose weight
is watched), checked against the float64 reference of tests/client/test_lowp.py applied to the very
tensors the test saw the matmuls use; micro-batches, cadence, batching and failure handling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import numwatch
from numwatch import protocol
from numwatch.capture import gemm
from numwatch.kernels import lowp
from tests.client.test_lowp import outlier_activations, ref_stats
from tests.support.watch_helpers import run_spool


class Projection(nn.Module):
    """A custom module calling F.linear itself, with rows of 48 (not a whole number of blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 48) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Planted(nn.Module):
    """fc1 gets the planted outlier-channel activations; fc2's dY rows are 48 long; proj is custom."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 48)
        self.proj = Projection()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.fc2(self.fc1(x)))


class Recorder:
    """What each watched matmul of the model saw, taken by the test's own hooks: X, W, dY per call."""

    def __init__(self, model: Planted) -> None:
        self.calls: dict[str, list[dict[str, torch.Tensor]]] = {}
        for name in ("fc1", "fc2", "proj"):
            getattr(model, name).register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            call = {"x": inputs[0].detach().clone(), "w": module.weight.detach().clone()}
            self.calls.setdefault(name, []).append(call)
            output.register_hook(lambda gradient: call.__setitem__("dy", gradient.detach().clone()))

        return record


def expected(calls: list[dict[str, torch.Tensor]], operand: str, max_rows: int = 1 << 30) -> list[float]:
    """The reference over a step's calls: lowest SQNR and largest range, shares over all elements
    (of the evenly spaced ``max_rows`` rows of an operand with more)."""
    per_tensor = "e5m2" if operand == "dy" else "e4m3"
    tensors = [calls[0]["w"]] if operand == "w" else [call[operand] for call in calls]
    samples = [slice(None, None, -(-tensor.reshape(-1, tensor.shape[-1]).shape[0] // max_rows)) for tensor in tensors]
    stats = [ref_stats(tensor, per_tensor, rows) for tensor, rows in zip(tensors, samples, strict=True)]
    nonzero = [
        int((tensor.reshape(-1, tensor.shape[-1])[rows] != 0).sum())
        for tensor, rows in zip(tensors, samples, strict=True)
    ]
    out = []
    for row in range(lowp.STAT_ROWS - 1):
        if row % 3 == 0:
            out.append(min(s[row] for s in stats))
        else:
            out.append(sum(s[row] * n for s, n in zip(stats, nonzero, strict=True)) / max(1, sum(nonzero)))
    out.append(max(s[-1] for s in stats))
    return out


def measured(spooled: Any, step: dict[str, Any], index: int, operand: str) -> list[float]:
    return [float(spooled.stat(step, name)[index]) for name in protocol.GEMM_OPERAND_STATS[operand]]


def assert_close(got: list[float], want: list[float]) -> None:
    for row, (a, b) in enumerate(zip(got, want, strict=True)):
        if math.isinf(b) or math.isnan(b):
            assert a == b or (math.isnan(a) and math.isnan(b)), (row, a, b)
        else:
            assert a == pytest.approx(b, rel=1e-5, abs=1e-4 if b < 100 else 1.0), (row, a, b)


def inputs(micro_batch: int) -> torch.Tensor:
    x = outlier_activations(tokens=32)
    return x.roll(micro_batch * 7, 0) * (1 + micro_batch)


def train(model: Planted, watcher: Any, steps: int, micro_batches: int = 1) -> None:
    optimizer = watcher.optimizer
    for _ in range(steps):
        for micro in range(micro_batches):
            model(inputs(micro)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def one_watched_step(tmp_path: Any, run: str, gemm_rows: int) -> tuple[Recorder, Any, list[str], dict[str, Any]]:
    """One step of two micro-batches of the planted model, watched: its recorder, spool, tensor names, step."""
    model = Planted()
    recorder = Recorder(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    with numwatch.watch(model, optimizer, run=run, spool_dir=tmp_path, histogram_every=1, gemm_rows=gemm_rows) as w:
        train(model, w, steps=1, micro_batches=2)
    spooled = run_spool(tmp_path, run)
    assert spooled.runs[0]["config"]["gemm_rows"] == gemm_rows
    (step,) = spooled.steps
    return recorder, spooled, [tensor["name"] for tensor in spooled.runs[0]["tensors"]], step


def test_a_row_budget_measures_evenly_spaced_rows_of_every_operand(tmp_path: Any) -> None:
    # 32 tokens, weights of 64 and 48 rows, a budget of 8 rows: every 4th token of X and dY, every
    # 8th or 6th row of W, under the scales of the whole operands.
    recorder, spooled, names, step = one_watched_step(tmp_path, "rows", gemm_rows=8)
    for layer in ("fc1", "fc2", "proj"):
        for operand in protocol.GEMM_OPERANDS:
            got = measured(spooled, step, names.index(f"{layer}.weight"), operand)
            assert_close(got, expected(recorder.calls[layer], operand, max_rows=8))
    with pytest.raises(ValueError, match="gemm_rows"):
        numwatch.watch(Planted(), run="bad", spool_dir=tmp_path, gemm_rows=-1)


def test_every_operand_matches_the_reference_over_micro_batches(tmp_path: Any) -> None:
    recorder, spooled, names, step = one_watched_step(tmp_path, "gemm", gemm_rows=0)  # every row: exact
    for layer, weight in (("fc1", "fc1.weight"), ("fc2", "fc2.weight"), ("proj", "proj.weight")):
        calls = recorder.calls[layer]
        assert len(calls) == 2
        for operand in protocol.GEMM_OPERANDS:
            assert_close(measured(spooled, step, names.index(weight), operand), expected(calls, operand))
    for bias in ("fc1.bias", "fc2.bias"):  # not a matmul weight: NaN
        assert all(math.isnan(v) for v in measured(spooled, step, names.index(bias), "x"))
    # The planted fc1 input: per-tensor e4m3 flushes every channel but the outlier, MXFP8 (OCP) saturates it.
    x = measured(spooled, step, names.index("fc1.weight"), "x")
    assert x[1] > 0.98 and x[5] > 1 / 128 and x[8] == 0.0


def test_nothing_runs_on_unsampled_steps_and_zero_turns_it_off(tmp_path: Any, monkeypatch: Any) -> None:
    calls: list[int] = []
    original = lowp.operand_sums
    monkeypatch.setattr(lowp, "operand_sums", lambda *a: calls.append(1) or original(*a))
    model = Planted()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    with numwatch.watch(model, optimizer, run="cadence", spool_dir=tmp_path, histogram_every=3) as watcher:
        for step in range(1, 6):
            before = len(calls)
            train(model, watcher, steps=1)
            assert (len(calls) > before) == (step in (1, 4)), step
    spooled = run_spool(tmp_path, "cadence")
    assert [("gemm_x_e4m3_sqnr" in step["tensors"]) for step in spooled.steps] == [1, 0, 0, 1, 0]
    model = Planted()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    with numwatch.watch(model, optimizer, run="off", spool_dir=tmp_path, histogram_every=1, gemm_every=0) as w:
        assert w.gemm is None
        train(model, w, steps=2)
    assert not any("gemm_x_e4m3_sqnr" in step["tensors"] for step in run_spool(tmp_path, "off").steps)
    assert run_spool(tmp_path, "off").runs[0]["config"]["gemm_every"] == 0


def test_the_ops_per_step_do_not_grow_with_the_number_of_layers(tmp_path: Any, monkeypatch: Any) -> None:
    def count(layers: int) -> int:
        calls: list[int] = []
        original = lowp.operand_sums
        monkeypatch.setattr(lowp, "operand_sums", lambda *a: calls.append(len(a[0])) or original(*a))
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(layers)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        with numwatch.watch(model, optimizer, run=f"depth{layers}", spool_dir=tmp_path, histogram_every=1):
            model(torch.randn(16, 64)).sum().backward()
            optimizer.step()
        monkeypatch.setattr(lowp, "operand_sums", original)
        return len(calls)

    assert count(2) == count(12) == 3  # X, W at the forward's end; dY at the step's end


def test_held_operands_are_measured_early_past_the_limit(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(gemm, "PENDING_ELEMENTS", 64 * 64)
    model = Planted()
    recorder = Recorder(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    with numwatch.watch(model, optimizer, run="limit", spool_dir=tmp_path, histogram_every=1, gemm_rows=0) as watcher:
        train(model, watcher, steps=1)
    spooled = run_spool(tmp_path, "limit")
    names = [tensor["name"] for tensor in spooled.runs[0]["tensors"]]
    for operand in protocol.GEMM_OPERANDS:
        got = measured(spooled, spooled.steps[0], names.index("fc2.weight"), operand)
        assert_close(got, expected(recorder.calls["fc2"], operand))


def test_a_tied_head_multihead_attention_and_a_nonfinite_operand(tmp_path: Any) -> None:
    from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches

    cfg = GPTConfig(vocab_size=128, context=16, d_model=32, n_heads=2, n_layers=1)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = next(synthetic_batches(cfg, 2))
    with numwatch.watch(model, optimizer, run="gpt", spool_dir=tmp_path, histogram_every=1) as watcher:
        lm_loss(model(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            model.blocks[0].mlp[0].weight[3, 4] = math.nan
        lm_loss(model(x), y).backward()
        optimizer.step()
        assert watcher.monitoring_errors == 0
    spooled = run_spool(tmp_path, "gpt")
    names = [tensor["name"] for tensor in spooled.runs[0]["tensors"]]
    first, second = spooled.steps
    matmuls = ["tok.weight", "blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"]
    matmuls += ["blocks.0.mlp.0.weight", "blocks.0.mlp.2.weight"]
    sqnr = spooled.stat(first, "gemm_x_e4m3_sqnr")
    assert [names[i] for i in np.flatnonzero(np.isfinite(sqnr))] == matmuls  # the tied head is tok.weight
    assert np.isfinite(spooled.stat(first, "gemm_dy_e5m2_sqnr")[[names.index(n) for n in matmuls]]).all()
    mlp = names.index("blocks.0.mlp.0.weight")
    assert math.isnan(spooled.stat(second, "gemm_w_e4m3_sqnr")[mlp])  # NaN weight: non-finite, not a number
    assert math.isnan(spooled.stat(second, "gemm_w_range")[mlp])


def test_a_failing_measurement_never_reaches_training(tmp_path: Any, monkeypatch: Any) -> None:
    def broken(*args: Any) -> torch.Tensor:
        raise RuntimeError("planted failure")

    monkeypatch.setattr(lowp, "operand_sums", broken)
    model = Planted()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)
    with numwatch.watch(model, optimizer, run="broken", spool_dir=tmp_path, histogram_every=1) as watcher:
        train(model, watcher, steps=2)
        assert watcher.monitoring_errors >= 1
    steps = run_spool(tmp_path, "broken").steps
    assert not any("gemm_x_e4m3_sqnr" in step["tensors"] for step in steps)
