"""What is replicated is sent once; what differs between ranks is sent by every rank holding it (4 gloo ranks).

- Pipeline-style stages (each rank watches its own part, no DDP): every rank sends its tensors' statistics.
- Two DDP groups {0, 1} and {2, 3} (data parallel inside another parallelism): each group's first
  rank sends its group's statistics, the other names it.
- Stored bytes per step against a real collector for N = 1, 2, 4 DDP ranks: the replicated part is stored once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from numwatch import protocol
from tests.support.ddp import spawn
from tests.support.watch_helpers import run_spool

WORLD_SIZE = 4
STEPS = 4


def _stage(rank: int) -> nn.Module:
    torch.manual_seed(rank)
    return nn.Sequential(nn.Linear(4 + rank, 3), nn.Tanh(), nn.Linear(3, 1))


def _train(rank: int, world_size: int, spool_root: str) -> None:
    import numwatch

    # Stages: each rank its own model (different tensors), no reduction.
    model = _stage(rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = numwatch.watch(model, optimizer, run="stages", spool_dir=spool_root)
    norms = []
    for _ in range(STEPS):
        model(torch.ones(2, 4 + rank)).pow(2).mean().backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    # Two data-parallel groups (every rank creates both, in the same order).
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    torch.manual_seed(0)
    ddp = DDP(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)), process_group=groups[rank // 2])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    watcher = numwatch.watch(ddp, optimizer, run="groups", spool_dir=spool_root)
    generator = torch.Generator().manual_seed(rank)
    group_norms = []
    for _ in range(STEPS):
        ddp(torch.randn(2, 4, generator=generator)).pow(2).mean().backward()
        group_norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in ddp.parameters()])))
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()
    Path(spool_root, f"rank{rank}.json").write_text(json.dumps({"stages": norms, "groups": group_norms}))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicated")
    spawn(_train, WORLD_SIZE, str(root))
    return root, {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)}


def test_ranks_holding_different_tensors_each_send_theirs(job):
    root, expected = job
    for rank in range(WORLD_SIZE):
        spooled = run_spool(root, "stages", rank)
        assert [t["shape"] for t in spooled.runs[0]["tensors"]][0] == [3, 4 + rank]
        assert all(step["replicated_by"] is None and step["local"] is None for step in spooled.steps)
        assert [protocol.decode_float(s["global_grad_norm"]) for s in spooled.steps] == pytest.approx(
            expected[rank]["stages"], rel=1e-6
        )


def test_each_data_parallel_group_sends_its_statistics_once(job):
    root, expected = job
    for rank in range(WORLD_SIZE):
        steps = run_spool(root, "groups", rank).steps
        lead = rank // 2 * 2
        if rank == lead:
            assert all(step["replicated_by"] is None for step in steps)
            assert [protocol.decode_float(s["global_grad_norm"]) for s in steps] == pytest.approx(
                expected[rank]["groups"], rel=1e-6
            )
        else:
            assert all((s["replicated_by"], s["global_grad_norm"]) == (lead, None) for s in steps)
            assert all(set(s["tensors"]) <= set(protocol.GEMM_STATS) for s in steps)  # the matmuls' own inputs
        assert all(step["local"] is not None for step in steps)  # every rank's own gradient
    # The two groups' gradients differ (different data, reduced separately).
    assert not np.allclose(expected[0]["groups"], expected[2]["groups"])


# -- stored bytes per step --------------------------------------------------------------------

BYTE_STEPS = 40
LAYERS = 8


def _train_for_bytes(rank: int, world_size: int, url: str) -> None:
    import numwatch

    torch.manual_seed(0)
    layers = [module for _ in range(LAYERS) for module in (nn.Linear(64, 64), nn.Tanh())]
    model = DDP(nn.Sequential(*layers, nn.Linear(64, 1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # gemm_every=0: the matmuls' readiness is each rank's own (its inputs), sent by every rank.
    watcher = numwatch.watch(model, optimizer, run=f"bytes-{world_size}", url=url, histogram_every=10, gemm_every=0)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(BYTE_STEPS):
        model(torch.randn(8, 64, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    watcher.close()


def stored_bytes(database_url: str, run: str) -> dict[str, int]:
    """Bytes of a run's stored steps (per-step scalars and health; per-tensor arrays), histograms and rollups."""
    engine = sa.create_engine(database_url)
    columns = {
        "step_scalars": ("step_blocks", "length(header)"),
        "step_arrays": ("step_blocks", "length(arrays) + length(sampled)"),
        "histograms": ("histograms", "length(exponent) + length(linear_min) + length(linear_max) + length(linear)"),
        "rollups": ("rollups", "length(data)"),
    }
    with engine.connect() as connection:
        run_id = connection.execute(sa.text("SELECT id FROM runs WHERE name = :name"), {"name": run}).scalar_one()
        out = {
            name: int(
                connection.execute(
                    sa.text(f"SELECT coalesce(sum({expression}), 0) FROM {table} WHERE run_id = :id"), {"id": run_id}
                ).scalar_one()
            )
            for name, (table, expression) in columns.items()
        }
    engine.dispose()
    return out


def test_replicated_statistics_are_stored_once_per_step(collector, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'bytes.db'}"
    url = collector(database_url)
    per_step = {}
    for world_size in (1, 2, 4):
        spawn(_train_for_bytes, world_size, url)
        per_step[world_size] = {k: v / BYTE_STEPS for k, v in stored_bytes(database_url, f"bytes-{world_size}").items()}
    print("stored bytes per step:", json.dumps(per_step))
    # The per-tensor statistics and histograms are stored once, whatever N (the values differ a little:
    # the gradients average more data); each further rank adds its own step scalars and health only.
    for part in ("step_arrays", "histograms"):
        assert per_step[4][part] == pytest.approx(per_step[1][part], rel=0.25), part
    per_rank = (per_step[4]["step_scalars"] - per_step[1]["step_scalars"]) / 3
    assert per_rank < 250, per_step
