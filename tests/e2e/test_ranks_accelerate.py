"""Accelerate on 2 CPU processes (gloo) to a real collector: an Inf in rank 1's batch names rank 1.

``numwatch.watch(model, optimizer)`` on what ``accelerator.prepare`` returned (a DDP model): the
collector's ``rank_nonfinite`` event names rank 1 and says rank 0 was finite, and only rank 0
sends the replicated statistics.
"""

from __future__ import annotations

import math
import os

import httpx
import pytest
import torch

from tests.support.ddp import spawn

pytest.importorskip("accelerate")

RUN = "accelerate-ranks"
STEPS = 8
INF_AT = 4


def _train(rank: int, world_size: int, url: str) -> None:
    import accelerate

    import numwatch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    watcher = numwatch.watch(model, optimizer, run=RUN, url=url, on_nonfinite="ignore")
    generator = torch.Generator().manual_seed(rank)
    for step in range(1, STEPS + 1):
        x, y = torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)
        if step == INF_AT and rank == 1:
            x[0, 0] = math.inf
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()


def test_an_inf_on_one_accelerate_rank_names_it(collector) -> None:
    url = collector()
    spawn(_train, 2, url)
    with httpx.Client(base_url=url, timeout=30) as client:
        events = [e for e in client.get(f"/api/v1/runs/{RUN}/events").json() if e["kind"].startswith("rank_")]
        assert [(e["kind"], e["step"], e["rank"]) for e in events] == [("rank_nonfinite", INF_AT, 1)]
        assert (events[0]["details"]["ranks"], events[0]["details"]["finite_ranks"]) == ([1], [0])
        assert client.get(f"/api/v1/runs/{RUN}/steps/1", params={"rank": 1}).json()["replicated_by"] == 0
        assert client.get(f"/api/v1/runs/{RUN}/steps/1").json()["tensors"]  # rank 0's
