"""Which rank went wrong, end to end: 4 DDP ranks (gloo, spawned processes) stream to a real collector over HTTP.

One job trains five runs, one fault each (none in the first):

- balanced: no cross-rank event at all;
- an Inf in rank 2's batch at step K: one ``rank_nonfinite`` at K naming rank 2 only (and the
  post-reduction statistics of step K are non-finite);
- a NaN in every rank's batch at step K: one ``rank_nonfinite`` saying all ranks;
- rank 1 sleeps in its forward: a ``straggler`` naming rank 1;
- one bit of one weight flipped on rank 3 after step FLIP: ``replica_divergence`` naming rank 3 at
  the next sampled step, and none before.
"""

from __future__ import annotations

import math
import time

import httpx
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from numwatch import protocol
from tests.support.ddp import spawn

WORLD_SIZE = 4
STEPS = 14
K = 6  # the step whose batch is poisoned
FLIP = 6  # rank 3's weight flips after this step
SAMPLED_EVERY = 4  # sampled steps: 1, 5, 9, 13
NEXT_SAMPLED = 9
SLEEP = 0.25
RUNS = ("balanced", "inf-rank2", "nan-all", "slow-rank1", "flip-rank3")
CROSS_RANK = ("rank_nonfinite", "rank_outlier", "straggler", "replica_divergence")


def _train(rank: int, world_size: int, url: str) -> None:
    import numwatch

    for run in RUNS:
        torch.manual_seed(0)
        model = DDP(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        if run == "slow-rank1" and rank == 1:
            model.module[0].register_forward_pre_hook(lambda module, args: time.sleep(SLEEP))
        watcher = numwatch.watch(model, optimizer, run=run, url=url, histogram_every=SAMPLED_EVERY)
        generator = torch.Generator().manual_seed(100 + rank)
        for step in range(1, STEPS + 1):
            x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)
            if step == K and (run == "nan-all" or (run == "inf-rank2" and rank == 2)):
                x[0, 0] = math.nan if run == "nan-all" else math.inf
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if run == "flip-rank3" and rank == 3 and step == FLIP:
                with torch.no_grad():
                    model.module[2].weight.view(torch.int32)[0, 5] ^= 1 << 3  # a low mantissa bit
        watcher.close()
        assert watcher.dropped_steps == 0 and watcher.monitoring_errors == 0


def _events(url: str, run: str) -> list[dict]:
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.get(f"/api/v1/runs/{run}/events")
        response.raise_for_status()
        return response.json()


def test_each_fault_names_its_rank_and_a_balanced_run_names_none(collector) -> None:
    # Timer noise on a loaded CPU runner is tens of ms; the sleep is 250 ms.
    url = collector(None, NUMWATCH_DETECT_STRAGGLER_MIN_EXCESS="0.1")
    spawn(_train, WORLD_SIZE, url)
    found = {run: [e for e in _events(url, run) if e["kind"] in CROSS_RANK] for run in RUNS}
    summary = {run: [(e["kind"], e["step"], e["rank"]) for e in events] for run, events in found.items()}

    assert summary["balanced"] == [], found["balanced"]
    assert summary["inf-rank2"] == [("rank_nonfinite", K, 2)]
    details = found["inf-rank2"][0]["details"]
    assert (details["ranks"], details["finite_ranks"], details["all_ranks"]) == ([2], [0, 1, 3], False)
    with httpx.Client(base_url=url, timeout=30) as client:
        record = client.get(f"/api/v1/runs/inf-rank2/steps/{K}").json()  # after the all-reduce: every rank's NaN
        assert not math.isfinite(protocol.decode_float(record["global_grad_norm"]))
        assert record["local"]["nonfinite"] == 0 and math.isfinite(protocol.decode_float(record["local"]["grad_norm"]))

    assert summary["nan-all"] == [("rank_nonfinite", K, 0)]
    assert found["nan-all"][0]["details"]["all_ranks"] and found["nan-all"][0]["details"]["ranks"] == [0, 1, 2, 3]
    assert [(kind, rank) for kind, _, rank in summary["slow-rank1"]] == [("straggler", 1)]
    assert summary["flip-rank3"] == [("replica_divergence", NEXT_SAMPLED, 3)]
