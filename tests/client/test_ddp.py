"""Two DDP processes (gloo, CPU): every rank spools its own records, tagged with its rank; the statistics
of the all-reduced gradients, the same on both, come from rank 0 only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from numwatch import protocol
from numwatch.monitor.ops.stack import free_port
from tests.support.watch_helpers import read_spool

WORLD_SIZE = 2
STEPS = 3


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
    mp.spawn(_train, args=(free_port(), str(tmp_path), root), nprocs=WORLD_SIZE, join=True)
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
        assert spooled.statuses[-1] == "finished"
        assert all(s["local"] is not None and protocol.decode_float(s["loss"]) > 0 for s in spooled.steps)
    # Before clipping: what clip_grad_norm_ returned (after the all-reduce, the same on both ranks).
    returned = json.loads((tmp_path / "clip0.json").read_text())
    assert returned == json.loads((tmp_path / "clip1.json").read_text())
    steps0 = per_rank[0].steps
    assert [protocol.decode_float(s["global_grad_norm"]) for s in steps0] == pytest.approx(returned, rel=1e-5)
    assert all(s["clipped"] and s["replicated_by"] is None and s["tensors"] for s in steps0)
    assert per_rank[0].histograms
    # Rank 1 holds the same all-reduced gradients: it sends none of their statistics, only its own health
    # (and its matmuls' readiness on sampled steps: their inputs are its own).
    for step in per_rank[1].steps:
        assert (step["replicated_by"], step["global_grad_norm"]) == (0, None)
        assert set(step["tensors"]) <= set(protocol.GEMM_STATS)
    assert per_rank[1].histograms == []
