"""Two DDP processes (gloo, CPU): every rank spools its own records, tagged with its rank."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from numwatch import protocol
from tests.support.watch_helpers import read_spool

WORLD_SIZE = 2
STEPS = 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _train(rank: int, port: int, spool_root: str, root: str) -> None:
    sys.path.insert(0, root)
    import numwatch  # imported in the child: spawn starts a fresh interpreter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        watcher = numwatch.watch(model, optimizer, spool_dir=spool_root)  # run name comes from rank 0
        generator = torch.Generator().manual_seed(rank)
        clipped = []
        for _ in range(STEPS):
            loss = model(torch.randn(8, 5, generator=generator)).pow(2).mean()
            loss.backward()
            clipped.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)))
            optimizer.step()
            optimizer.zero_grad()
        watcher.close()
        Path(spool_root, f"clip{rank}.json").write_text(json.dumps(clipped))
    finally:
        dist.destroy_process_group()


def test_both_ranks_spool_their_records(tmp_path):
    root = str(Path(__file__).resolve().parents[2])
    mp.spawn(_train, args=(_free_port(), str(tmp_path), root), nprocs=WORLD_SIZE, join=True)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # the ranks of one job: one run, one instance
    per_rank = {rank: read_spool(run_dir / f"rank{rank}") for rank in range(WORLD_SIZE)}
    for rank, spooled in per_rank.items():
        (run,) = spooled.runs
        first = per_rank[0].runs[0]
        assert (run["rank"], run["world_size"], run["run"], run["instance"]) == (
            rank,
            WORLD_SIZE,
            first["run"],
            first["instance"],
        )
        assert [s["step"] for s in spooled.steps] == list(range(1, STEPS + 1))
        # Before clipping: what clip_grad_norm_ returned on this rank (after the all-reduce).
        returned = json.loads((tmp_path / f"clip{rank}.json").read_text())
        assert [protocol.decode_float(s["global_grad_norm"]) for s in spooled.steps] == pytest.approx(
            returned, rel=1e-5
        )
        assert all(s["clipped"] for s in spooled.steps)
        assert spooled.statuses[-1] == "finished"
    # Measured after the all-reduce: both ranks see the same averaged gradients.
    for step0, step1 in zip(per_rank[0].steps, per_rank[1].steps, strict=True):
        np.testing.assert_array_equal(per_rank[0].stat(step0, "grad_norm"), per_rank[1].stat(step1, "grad_norm"))
