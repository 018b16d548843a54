"""Each rank's local health under DDP (4 gloo ranks): its gradient before the all-reduce, its loss, its compute time.

Every number is checked against the loop's own: a plain copy of the model (same weights each
step) runs the rank's micro-batches with ordinary accumulation, and ``get_total_norm`` of its
gradients is what the rank handed to the all-reduce. A user's communication hook (bf16
compression) registered before or after ``watch()`` still runs: an unwatched twin with the same
hook gets bit-identical gradients and losses.
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from numwatch import protocol
from tests.support.ddp import spawn
from tests.support.watch_helpers import run_spool

WORLD_SIZE = 4
STEPS = 5
MICRO = 2
SAMPLED = {1, 3, 5}  # histogram_every=2
MODES = ("default", "hook_after_watch", "hook_before_watch")


def bit_sum(tensors: list[torch.Tensor]) -> int:
    """The bit patterns of float32 tensors summed as signed 32-bit integers, wrapped to a signed 64-bit one."""
    total = sum(int(np.frombuffer(t.detach().numpy().tobytes(), np.int32).astype(np.int64).sum()) for t in tensors)
    return (total + 2**63) % 2**64 - 2**63


def user_bf16_hook(state, bucket):  # DDP checks the annotations, which this module's are strings
    """A user's hook: the bucket all-reduced in bf16 (as torch's user_bf16_hook, which DDP allows on NCCL only)."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size())
    future = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


def _ddp(net: nn.Module, mode: str) -> DDP:
    model = DDP(copy.deepcopy(net), bucket_cap_mb=0.0002)  # several buckets
    if mode == "hook_before_watch":
        model.register_comm_hook(None, user_bf16_hook)
    return model


def _train(rank: int, world_size: int, spool_root: str, out: str) -> None:
    import numwatch

    results = {}
    for mode in MODES:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
        reference = copy.deepcopy(net)
        watched, twin = _ddp(net, mode), _ddp(net, mode)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (watched, twin)]
        watcher = numwatch.watch(watched, optimizers[0], run=f"local-{mode}", spool_dir=spool_root, histogram_every=2)
        if mode == "hook_after_watch":
            for model in (watched, twin):
                model.register_comm_hook(None, user_bf16_hook)
        generator = torch.Generator().manual_seed(rank)
        expected, identical = [], True
        for _ in range(STEPS):
            batches = [torch.randn(4, 5, generator=generator) * (rank + 1) for _ in range(MICRO)]
            reference.load_state_dict(watched.module.state_dict())
            reference.zero_grad(set_to_none=True)
            for x in batches:
                (reference(x).pow(2).mean() / MICRO).backward()
            grads = [p.grad for p in reference.parameters()]
            expected.append(
                {
                    "norm": float(torch.nn.utils.get_total_norm(grads)),
                    "checksum": bit_sum(list(watched.module.parameters())),
                }
            )
            losses: dict[int, list[float]] = {0: [], 1: []}
            for which, model in enumerate((watched, twin)):
                for i, x in enumerate(batches):
                    with model.no_sync() if i < MICRO - 1 else nullcontext():
                        loss = model(x).pow(2).mean() / MICRO
                        loss.backward()
                        losses[which].append(loss.item())
            expected[-1]["loss"] = float(np.sum(np.float32(losses[0]), dtype=np.float32))
            identical &= losses[0] == losses[1] and all(
                torch.equal(a.grad, b.grad) for a, b in zip(watched.parameters(), twin.parameters(), strict=True)
            )
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
        watcher.close()
        results[mode] = {"expected": expected, "identical": identical, "probe": watcher._local.mode}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    spawn(_train, WORLD_SIZE, str(root), str(root))
    return root, {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)}


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_reports_its_own_gradient_before_the_reduction(job, mode):
    root, results = job
    norms = []
    for rank in range(WORLD_SIZE):
        result = results[rank][mode]
        assert result["probe"] == ("tensor_hooks" if mode == "hook_before_watch" else "comm_hook")
        steps = run_spool(root, f"local-{mode}", rank).steps
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        for step, expected in zip(steps, result["expected"], strict=True):
            local = step["local"]
            assert protocol.decode_float(local["grad_norm"]) == pytest.approx(expected["norm"], rel=1e-6)
            assert local["nonfinite"] == 0
            assert protocol.decode_float(step["loss"]) == pytest.approx(expected["loss"], rel=1e-6)
            assert protocol.decode_float(local["compute_time"]) > 0
            if step["step"] in SAMPLED:
                assert local["checksum"] == expected["checksum"]
                assert local["nonfinite_tensors"] == []
            else:
                assert local["checksum"] is None and local["nonfinite_tensors"] is None
        norms.append([protocol.decode_float(s["local"]["grad_norm"]) for s in steps])
    # The ranks' data differ (scaled by rank + 1): so do their local gradients.
    assert len({round(n[0], 6) for n in norms}) == WORLD_SIZE


@pytest.mark.parametrize("mode", MODES)
def test_the_users_communication_hook_still_applies(job, mode):
    _, results = job
    assert all(results[rank][mode]["identical"] for rank in range(WORLD_SIZE))
