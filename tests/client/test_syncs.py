"""On the accelerator path a watched step adds no host sync: nothing that makes the device
wait for the host, except the step's one documented host copy (tests/support/syncs.py).

Each kind of step (tests/support/step_kinds.py) runs twice on the accelerator path (the CPU's
tensors sent down it): once unwatched and once watched, the same loop from the same seed,
under a :class:`SyncRecorder`. Whatever the watched run records beyond the unwatched one is
numwatch's. benchmarks/gpu_check.py runs the same loops on a GPU.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from numwatch.kernels.device import simulate_accelerator
from numwatch.monitor.ops.stack import free_port
from tests.support.deepspeed_ranks import init_deepspeed, run_rank, zero_config
from tests.support.deepspeed_ranks import spawn as zero_spawn
from tests.support.step_kinds import LOOPS, RECORDED, WARMUP, Loop, added, inputs, mlp, record
from tests.support.syncs import SyncRecorder

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", list(LOOPS))
def test_a_watched_step_adds_no_host_sync(kind: str, tmp_path: Path) -> None:
    with simulate_accelerator():
        baseline = record(LOOPS[kind], CPU, None)
        watched = record(LOOPS[kind], CPU, tmp_path)
    assert not added(baseline, watched), "\n".join(added(baseline, watched))
    # One copy per step; close() may add one for the final weights' statistics.
    assert RECORDED <= watched.host_copies <= RECORDED + 1
    assert len(watched.steps) == WARMUP + RECORDED


def test_the_recorder_sees_every_kind_of_sync() -> None:
    """The detector itself: each kind of host sync, on the simulated accelerator."""
    x = torch.randn(10)
    with simulate_accelerator(), SyncRecorder() as recorder:
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
        x.masked_select(x > 0)
        _ = x[x > 0]
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.tolist()
        x.cpu()
        x.numpy()
        x.to("cpu")
        torch.tensor([1.0], device="cpu")
        torch.bincount(torch.tensor([1, 2]))
        torch.histc(x, bins=4)
        # None of these waits: fixed sizes, fixed ranges, non-blocking moves.
        torch.histc(x, bins=4, min=-1, max=1)
        x.to("cpu", non_blocking=True)
        torch.repeat_interleave(x, torch.full((10,), 2), output_size=20)
        x.index_select(0, torch.tensor([1, 2]))
    assert recorder.kinds() == {
        "item": 2,
        "nonzero": 1,
        "masked_select": 1,
        "boolean-mask index": 1,
        "unique": 1,
        "repeat_interleave": 1,
        "tolist": 1,
        "copy to host": 1,
        "numpy": 1,
        "transfer that may block": 1,
        "blocking copy to the device": 1,
        "bincount": 1,
        "histc of an unknown range": 1,
    }
    assert all("test_syncs.py" in sync.where for sync in recorder.syncs)


# --------------------------------------------------------------------------- DDP and FSDP2, two gloo ranks

WORLD_SIZE = 2


def _distributed_loop(wrap: str, device: torch.device) -> Loop:
    model = mlp(device)
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rank = torch.distributed.get_rank()

    def step(number: int) -> None:
        model(inputs(number * WORLD_SIZE + rank, device)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()

    return Loop(model, opt, step, watch={"histogram_every": 2, "format_every": 1, "quant_every": 2})


def _distributed(rank: int, wrap: str, port: int, spool_root: str, root: str) -> None:
    sys.path.insert(0, root)
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    with simulate_accelerator():
        baseline = record(lambda device: _distributed_loop(wrap, device), CPU, None)
        watched = record(lambda device: _distributed_loop(wrap, device), CPU, Path(spool_root, "spool"))
    result = {"added": added(baseline, watched), "copies": watched.host_copies, "steps": len(watched.steps)}
    Path(spool_root, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)  # gloo aborts at interpreter exit otherwise


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_distributed_steps_add_no_host_sync(wrap: str, tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    mp.spawn(_distributed, args=(wrap, free_port(), str(tmp_path), root), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not result["added"], "\n".join(result["added"])
        assert RECORDED <= result["copies"] <= RECORDED + 1
        assert result["steps"] == WARMUP + RECORDED


# --------------------------------------------------------------------------- DeepSpeed ZeRO, two gloo ranks

ZERO_SETUPS = ((1, "fp32"), (2, "bf16"), (3, "fp16"))


def _zero_loop(deepspeed: Any, stage: int, dtype: str) -> Callable[[torch.device], Loop]:
    def build(device: torch.device) -> Loop:
        model = mlp(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        config = zero_config(stage, dtype, micro_batch=16, gradient_clipping=0.5)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        rank = torch.distributed.get_rank()
        low = next(engine.module.parameters()).dtype

        def step(number: int) -> None:
            engine.backward(engine(inputs(number * WORLD_SIZE + rank, device).to(low)).float().pow(2).mean())
            engine.step()

        return Loop(engine, engine.optimizer, step, watch={"histogram_every": 2, "format_every": 1, "quant_every": 2})

    return build


def _zero(rank: int, port: int, out: str) -> None:
    def body() -> None:
        deepspeed = init_deepspeed(rank, port)
        results = {}
        for stage, dtype in ZERO_SETUPS:
            # DeepSpeed's own syncs (its overflow check) are in both runs; only numwatch's are added.
            with simulate_accelerator():
                baseline = record(_zero_loop(deepspeed, stage, dtype), CPU, None)
                watched = record(_zero_loop(deepspeed, stage, dtype), CPU, Path(out, f"spool-{stage}"))
            results[f"zero{stage}-{dtype}"] = {
                "added": added(baseline, watched),
                "copies": watched.host_copies,
                "steps": len(watched.steps),
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))

    run_rank(body)


@pytest.mark.slow
def test_deepspeed_zero_steps_add_no_host_sync(tmp_path: Path) -> None:
    zero_spawn(_zero, str(tmp_path))
    for rank in range(WORLD_SIZE):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == sorted(f"zero{stage}-{dtype}" for stage, dtype in ZERO_SETUPS)
        for setup, result in results.items():
            assert not result["added"], (setup, result["added"])
            assert RECORDED <= result["copies"] <= RECORDED + 1, setup
            assert result["steps"] == WARMUP + RECORDED, setup
