"""FSDP2 (fully_shard, DTensor) on CPU with gloo, two processes: Adam health and quantization
SQNR of the whole tensors, from the shards.

The model's tensors cover each case: a weight sharded by rows whose second shard starts on
an NF4 block boundary, one whose second shard does not, a weight sharded by columns
(``Shard(1)``), and a bias of one element (rank 1's shard is empty). After each step both
ranks gather the full weights and Adam state (``full_tensor``); rank 0 saves them, and the
references are computed from them in float64 by the reference quantizers and Adam formula
of the single-process tests.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.client.test_fsdp import WORLD_SIZE, spawn_ranks
from tests.client.test_optim_health import reference_adam
from tests.client.test_quantization import REFERENCES, sqnr_db
from tests.support.watch_helpers import read_spool

STEPS = 4
HISTOGRAM_EVERY = 2  # Adam health on steps 1 and 3
QUANT_EVERY = 2  # SQNR on steps 2 and 4
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
# What the shards can measure (see numwatch.kernels.sharded): NF4 needs each shard to start on a
# block of 64; only fp8 under Shard(1). 1-D tensors are not quantized.
MEASURED = {
    "0.weight": {"int8", "int4", "nf4", "fp8"},  # (32, 200) by rows: rank 1 starts at 16·200 = 50·64
    "2.weight": {"int8", "int4", "fp8"},  # (18, 32) by rows: rank 1 starts at 9·32 = 4.5·64
    "4.weight": {"fp8"},  # (1, 18) by columns (FSDP needs them even)
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(200, 32), torch.nn.Tanh(), torch.nn.Linear(32, 18), torch.nn.Tanh(), torch.nn.Linear(18, 1)
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(8, 200, generator=generator)
    inputs[:, 0] = 0.0  # column 0 of the first weight never has a gradient: 32 elements with v = 0
    return inputs, torch.randn(8, 1, generator=generator)


def _train(rank: int, port: int, spool_root: str, root: str) -> None:
    sys.path.insert(0, root)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    import numwatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model = _model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model[4], mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        watcher = numwatch.watch(
            model,
            optimizer,
            run="fsdp-health",
            spool_dir=spool_root,
            histogram_every=HISTOGRAM_EVERY,
            quant_every=QUANT_EVERY,
        )
        saved: dict[str, dict] = {"weights": {}, "adam": {}}
        half = 8 // WORLD_SIZE
        for step in range(1, STEPS + 1):
            inputs, targets = _batch(step)
            mine = slice(rank * half, (rank + 1) * half)
            torch.nn.functional.mse_loss(model(inputs[mine]), targets[mine]).backward()
            optimizer.step()
            optimizer.zero_grad()
            # Collectives: both ranks gather, in the same order.
            weights = [p.full_tensor().detach().double() for p in model.parameters()]
            states = [
                {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in optimizer.state[p].items()}
                for p in model.parameters()
            ]
            saved["weights"][step] = [w.numpy() for w in weights]
            saved["adam"][step] = [
                reference_adam(s["exp_avg"], s["exp_avg_sq"], int(s["step"]), (0.9, 0.999), 1e-8) for s in states
            ]
            saved.setdefault("local_sizes", [p.to_local().numel() for p in model.parameters()])
        watcher.close()
        torch.save(saved, Path(spool_root) / f"reference{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    spool = tmp_path_factory.mktemp("fsdp_health")
    spawn_ranks(_train, spool)
    saved = torch.load(spool / "reference0.pt", weights_only=False)
    (run_dir,) = spool.glob("fsdp-health.*")
    return saved, {rank: read_spool(run_dir / f"rank{rank}") for rank in range(WORLD_SIZE)}


def test_the_cases_are_the_planned_ones(fsdp_run):
    saved, per_rank = fsdp_run
    assert [t["name"] for t in per_rank[0].runs[0]["tensors"]] == NAMES
    assert saved["local_sizes"] == [
        16 * 200,
        16,
        9 * 32,
        9,
        9,
        1,
    ]  # rank 0's; rank 1 holds the rest (an empty bias of "4")


def test_adam_health_of_the_whole_tensors(fsdp_run):
    saved, per_rank = fsdp_run
    # Combined across the shards, the numbers are the same on both ranks: rank 0 sends them.
    assert all(s["replicated_by"] == 0 and not s["tensors"] for s in per_rank[1].steps)
    for spooled in [per_rank[0]]:
        sampled = [s for s in spooled.steps if "adam_update_rms" in s["tensors"]]
        assert [s["step"] for s in sampled] == [1, 3]
        for step in sampled:
            expected = np.array(saved["adam"][step["step"]])
            np.testing.assert_allclose(spooled.stat(step, "adam_update_rms"), expected[:, 0], rtol=1e-5)
            np.testing.assert_allclose(spooled.stat(step, "adam_eps_dominated"), expected[:, 1], rtol=1e-6, atol=0)
            assert expected[0, 1] == 32 / (32 * 200)


def test_quantization_sqnr_of_the_whole_tensors_where_the_shards_allow(fsdp_run):
    saved, per_rank = fsdp_run
    for spooled in [per_rank[0]]:
        measured = [s for s in spooled.steps if "quant_sqnr_int8" in s["tensors"]]
        assert [s["step"] for s in measured] == [2, 4]
        for step in measured:
            weights = saved["weights"][step["step"]]
            for scheme, reference in REFERENCES.items():
                got = spooled.stat(step, f"quant_sqnr_{scheme}")
                for name, value, w in zip(NAMES, got, weights, strict=True):
                    if scheme in MEASURED.get(name, set()):
                        assert value == pytest.approx(sqnr_db(w, reference(w)), abs=1e-3), (name, scheme)
                    else:
                        assert math.isnan(value), (name, scheme)
