"""DeepSpeed ZeRO on 2 CPU processes (gloo) to a real collector: a NaN born in one rank's backward names that rank.

A faulty device computes a wrong gradient, not a wrong loss: here one layer's backward returns
NaN on rank 1 at step ``BAD``, while every rank's loss stays finite. After ZeRO's reduction
every rank holds the NaN, so only each rank's own gradient, seen before the reduction, tells
which one produced it. Under ZeRO-2 in bf16 (what fine-tuning runs mostly use) and under ZeRO-3
in fp16, the collector's ``rank_nonfinite`` event names rank 1, says rank 0 was finite and
names the tensors whose local gradient was not finite; the step is recorded as skipped.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import torch

from numwatch import protocol
from tests.support.deepspeed_ranks import init_deepspeed, run_rank, spawn, zero_config

STEPS = 6
BAD = 4  # the step whose backward goes wrong on rank 1
SETUPS = {"zero2-bf16": (2, "bf16"), "zero3-fp16": (3, "fp16")}


class _Faulty(torch.autograd.Function):
    """The identity forward; its backward returns NaN while ``poison`` is set (a faulty kernel)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, poison: bool) -> torch.Tensor:
        ctx.poison = poison
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (torch.full_like(grad, math.nan) if ctx.poison else grad), None


class FaultyBackward(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Faulty.apply(x, self.poison)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), FaultyBackward(), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(rank: int, port: int, url: str) -> None:
    def body() -> None:
        deepspeed = init_deepspeed(rank, port)
        import numwatch

        for run, (stage, dtype) in SETUPS.items():
            model = _model()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            config = zero_config(stage, dtype, micro_batch=4, gradient_clipping=1.0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            low = next(engine.module.parameters()).dtype
            generator = torch.Generator().manual_seed(rank)
            with numwatch.watch(engine, run=run, url=url, on_nonfinite="ignore") as watcher:
                for step in range(1, STEPS + 1):
                    x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
                    engine.module[1].poison = step == BAD and rank == 1
                    loss = torch.nn.functional.mse_loss(engine(x.to(low)), y.to(low))
                    assert math.isfinite(float(loss.detach()))  # the fault is in the backward only
                    engine.backward(loss)
                    engine.step()
                watcher.flush()
                assert watcher.monitoring_errors == 0

    run_rank(body)


def test_a_nan_born_in_one_ranks_backward_names_that_rank(collector) -> None:
    url = collector()
    spawn(_train, url)
    with httpx.Client(base_url=url, timeout=30) as client:
        for run in SETUPS:
            events = [e for e in client.get(f"/api/v1/runs/{run}/events").json() if e["kind"].startswith("rank_")]
            assert [(e["kind"], e["step"], e["rank"]) for e in events] == [("rank_nonfinite", BAD, 1)], run
            details = events[0]["details"]
            assert (details["ranks"], details["finite_ranks"]) == ([1], [0])
            assert "non-finite local gradient" in details["message"]
            assert sorted(details["tensors"]["1"]) == ["0.bias", "0.weight"]  # below the faulty layer only
            for rank in (0, 1):
                step = client.get(f"/api/v1/runs/{run}/steps/{BAD}", params={"rank": rank}).json()
                assert step["skipped"] is True  # reduced, the NaN reached both ranks: DeepSpeed skipped it
                local = step["local"]
                assert local["compute_time"] is None  # not measured under ZeRO
                if rank == 1:
                    assert local["nonfinite"] == 16 * 6 + 16  # every element of 0.weight and 0.bias
                    assert math.isnan(protocol.decode_float(local["grad_norm"]))
                else:
                    assert local["nonfinite"] == 0 and math.isfinite(protocol.decode_float(local["grad_norm"]))
            for rank in (0, 1):  # every step's own norm is stored per rank; rank 1's is NaN at BAD only
                series = client.get(
                    f"/api/v1/runs/{run}/series", params={"metric": "local_grad_norm", "rank": rank}
                ).json()
                assert series["steps"] == list(range(1, STEPS + 1))
                bad = [
                    step
                    for step, v in zip(series["steps"], series["values"], strict=True)
                    if v is None or not math.isfinite(protocol.decode_float(v))
                ]
                assert bad == ([BAD] if rank == 1 else [])
