"""FSDP2 (fully_shard, DTensor) on CPU with gloo, two processes: whole-tensor statistics.

Each rank trains the sharded model on its half of every batch; rank 0 also trains the same
model unsharded on the whole batch (the single-process run) and saves float64 reference
statistics of it. The spooled per-tensor statistics of both ranks must describe the whole
tensors: equal to the reference, not to one rank's shard.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from numwatch.monitor.ops.stack import free_port
from tests.support.binaries import missing
from tests.support.collector_docs import values
from tests.support.watch_helpers import read_spool

WORLD_SIZE = 2
STEPS = 3
HISTOGRAM_EVERY = 2  # steps 1 and 3 are sampled
BATCH = 8
RTOL = 1e-5
CLIP = 0.05  # below every step's norm: each step is clipped


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: the shards of every tensor are uneven (and bias 3 splits 2/1).
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(BATCH, 6, generator=generator)
    inputs[:, 0] = 0.0  # column 0 of the first weight's gradient is exactly zero: 17 known zeros
    return inputs, torch.randn(BATCH, 3, generator=generator)


def _reference_stats(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """float64 statistics of the unsharded model's gradients and weights, by plain numpy."""
    grads = [p.grad.detach().double().numpy().ravel() for p in model.parameters()]
    grads32 = [p.grad.detach().ravel() for p in model.parameters()]
    return {
        "grad_norm": np.array([np.sqrt(np.sum(g * g)) for g in grads]),
        "grad_absmax": np.array([np.max(np.abs(g)) for g in grads]),
        "zeros": np.array([np.count_nonzero(g == 0) for g in grads]),
        # The literal cast to fp16 (the target format) decides underflow.
        "underflow": np.array([int(((g != 0) & (g.half() == 0)).sum()) for g in grads32]),
    }


def _weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().double().numpy().ravel() for p in model.parameters()]


def _train(rank: int, port: int, spool_root: str, root: str) -> None:
    sys.path.insert(0, root)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, init_device_mesh

    import numwatch  # imported in the child: spawn starts a fresh interpreter
    from numwatch.kernels.sharded import ShardReduction

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        collectives: list[int] = []
        original = ShardReduction._all_reduce

        def counted(self, parts, op):
            collectives[-1] += bool(parts)
            return original(self, parts, op)

        ShardReduction._all_reduce = counted

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model = _model()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        watcher = numwatch.watch(
            model,
            optimizer,
            run="fsdp",
            spool_dir=spool_root,
            format="fp16",
            format_every=1,
            histogram_every=HISTOGRAM_EVERY,
        )

        reference = _model()
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
        saved: dict[str, list] = {"steps": [], "weights": [], "clip_returned": [], "own_norms": []}
        half = BATCH // WORLD_SIZE
        for step in range(1, STEPS + 1):
            inputs, targets = _batch(step)
            mine = slice(rank * half, (rank + 1) * half)
            collectives.append(0)  # the gradients are read when the backward ends
            torch.nn.functional.mse_loss(model(inputs[mine]), targets[mine]).backward()
            returned = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            saved["clip_returned"].append(float(returned.full_tensor() if isinstance(returned, DTensor) else returned))
            optimizer.step()
            optimizer.zero_grad()
            # This rank's own gradient, before the reduce-scatter: its half of the batch.
            own = torch.autograd.grad(
                torch.nn.functional.mse_loss(reference(inputs[mine]), targets[mine]), list(reference.parameters())
            )
            saved["own_norms"].append(float(torch.linalg.vector_norm(torch.cat([g.double().ravel() for g in own]))))
            if reference is not None:
                # Mean loss over the whole batch: the gradient FSDP's averaged reduce-scatter gives.
                torch.nn.functional.mse_loss(reference(inputs), targets).backward()
                saved["steps"].append(_reference_stats(reference))  # before clipping, as numwatch records
                torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
                reference_optimizer.step()
                reference_optimizer.zero_grad()
                saved["weights"].append(_weights(reference))
        # One more step with a NaN in rank 1's shard of the first weight only.
        inputs, targets = _batch(STEPS + 1)
        collectives.append(0)
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        if rank == 1:
            model[0].weight.grad.to_local()[0, 1] = float("nan")
        collectives.append(0)
        watcher.gradients_ready()  # the gradients changed after the backward: read them again
        optimizer.step()
        collectives.append(0)
        watcher.close()

        saved["collectives"] = collectives
        partial = torch.nn.Linear(2, 2)
        partial.weight = torch.nn.Parameter(DTensor.from_local(torch.ones(2, 2), mesh, [Partial()]))
        try:
            numwatch.watch(partial, run="partial", spool_dir=spool_root)
        except numwatch.UnsupportedConfiguration as refusal:
            saved["refusal"] = str(refusal)
        torch.save(saved, Path(spool_root) / f"reference{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(train, spool: Path) -> None:
    """Run ``train(rank, port, spool, repository root)`` in WORLD_SIZE fresh processes."""
    if not dist.is_available():
        missing("torch.distributed is not available in this build")
    root = str(Path(__file__).resolve().parents[2])
    mp.spawn(train, args=(free_port(), str(spool), root), nprocs=WORLD_SIZE, join=True)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    spool = tmp_path_factory.mktemp("fsdp")
    spawn_ranks(_train, spool)
    saved = torch.load(spool / "reference0.pt", weights_only=False)
    by_rank = [torch.load(spool / f"reference{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    saved["clip_returned_by_rank"] = [ranks["clip_returned"] for ranks in by_rank]
    saved["own_norms_by_rank"] = [ranks["own_norms"] for ranks in by_rank]
    (run_dir,) = spool.glob("fsdp.*")  # both ranks are one instance
    per_rank = {rank: read_spool(run_dir / f"rank{rank}") for rank in range(WORLD_SIZE)}
    return saved, per_rank


def test_gradient_statistics_describe_the_whole_tensor(fsdp_run):
    saved, per_rank = fsdp_run
    for rank, spooled in per_rank.items():
        assert [s["step"] for s in spooled.steps] == list(range(1, STEPS + 2))
        assert spooled.runs[0]["config"]["sharded"] is True
        assert [t["shape"] for t in spooled.runs[0]["tensors"]] == [[17, 6], [17], [3, 17], [3]]
        if rank == 1:
            # Combined across the shards, the numbers are the same on both ranks: rank 0 sends them.
            assert all(
                (s["replicated_by"], s["tensors"], s["global_grad_norm"]) == (0, {}, None) for s in spooled.steps
            )
            continue
        # The first STEPS steps have a single-process reference; the last is the NaN step.
        for step, expected in zip(spooled.steps[:STEPS], saved["steps"], strict=True):
            np.testing.assert_allclose(spooled.stat(step, "grad_norm"), expected["grad_norm"], rtol=RTOL)
            np.testing.assert_allclose(spooled.stat(step, "grad_absmax"), expected["grad_absmax"], rtol=RTOL)
            np.testing.assert_array_equal(spooled.stat(step, "zeros"), expected["zeros"])
            assert spooled.stat(step, "zeros")[0] == 17
            np.testing.assert_array_equal(spooled.stat(step, "underflow"), expected["underflow"])
            # The global norm equals the unsharded single-process run's.
            reference_global = np.sqrt(np.sum(expected["grad_norm"] ** 2))
            assert step["global_grad_norm"] == pytest.approx(reference_global, rel=RTOL)
        # Before clipping: what clip_grad_norm_ returned on this rank; clip_coef is its coefficient.
        for step, returned in zip(spooled.steps[:STEPS], saved["clip_returned_by_rank"][rank], strict=True):
            assert step["global_grad_norm"] == pytest.approx(returned, rel=RTOL)
            assert (
                step["clip_coef"] == pytest.approx(min(1.0, CLIP / (returned + 1e-6)), rel=RTOL)
                and step["clipped"] is True
            )


def test_each_ranks_local_health_is_its_own_gradient_before_the_reduce_scatter(fsdp_run):
    saved, per_rank = fsdp_run
    for rank, spooled in per_rank.items():
        own = saved["own_norms_by_rank"][rank]
        assert len(own) == STEPS
        for step, expected in zip(spooled.steps[:STEPS], own, strict=True):
            local = step["local"]
            assert local["grad_norm"] == pytest.approx(expected, rel=RTOL), (rank, step["step"])
            assert local["nonfinite"] == 0
            # FSDP gathers parameters in the forward: a rank's time includes waiting for the others.
            assert local["compute_time"] is None and local["checksum"] is None
        assert own[0] != pytest.approx(saved["own_norms_by_rank"][1 - rank][0], rel=1e-3)  # each rank its own
        # The NaN was written into the reduced shard after the backward: every rank's own gradient was finite.
        assert spooled.steps[-1]["local"]["nonfinite"] == 0


def test_a_nan_in_one_shard_reaches_every_rank(fsdp_run):
    saved, per_rank = fsdp_run
    for rank, spooled in per_rank.items():
        (event,) = [e for e in spooled.events if e["kind"] == "nonfinite_origin"]  # each rank's own check
        assert event["details"]["tensors"][0] == {"name": "0.weight", "nan": 1, "inf": 0}
        if rank == 1:
            continue  # sent by rank 0
        last = spooled.steps[-1]
        norms, absmax = spooled.stat(last, "grad_norm"), spooled.stat(last, "grad_absmax")
        assert np.isnan(norms[0]) and np.isnan(absmax[0])
        assert np.all(np.isfinite(norms[1:])) and np.all(np.isfinite(absmax[1:]))
        np.testing.assert_array_equal(spooled.stat(last, "nan_count"), [1, 0, 0, 0])
        np.testing.assert_array_equal(spooled.stat(last, "inf_count"), [0, 0, 0, 0])
    # Read again after the NaN was written: norms and abs-max (one SUM, one MAX), then the NaN counts (one SUM).
    assert saved["collectives"][STEPS + 1] == 3
    # close() measures the final weights' quantization: the abs-maxima (a MAX and its NaN
    # flags' SUM), then the squared norms (one SUM), for all tensors together.
    assert saved["collectives"][STEPS + 2] == 3


def test_sampled_weight_statistics_and_histograms_cover_the_whole_tensor(fsdp_run):
    saved, per_rank = fsdp_run
    assert per_rank[1].histograms == []  # sent by rank 0
    for spooled in [per_rank[0]]:
        sampled = [s for s in spooled.steps if (s["step"] - 1) % HISTOGRAM_EVERY == 0]
        assert [s["step"] for s in sampled] == [1, 3]
        for step in sampled:
            weights = saved["weights"][step["step"] - 1]  # after that step's update
            np.testing.assert_allclose(
                spooled.stat(step, "weight_norm"), [np.linalg.norm(w) for w in weights], rtol=RTOL
            )
            np.testing.assert_allclose(
                spooled.stat(step, "weight_absmax"), [np.abs(w).max() for w in weights], rtol=RTOL
            )
        n_tensors = len(spooled.runs[0]["tensors"])
        for histogram in spooled.histograms:
            exponent = values(histogram["exponent"], "<i8").reshape(n_tensors, -1)
            linear = values(histogram["linear"], "<i8").reshape(n_tensors, -1)
            # Every element of every whole tensor is counted exactly once, in both histograms.
            np.testing.assert_array_equal(exponent.sum(axis=1), [17 * 6, 17, 3 * 17, 3])
            np.testing.assert_array_equal(linear.sum(axis=1), [17 * 6, 17, 3 * 17, 3])
            if histogram["kind"] == "weight":
                weights = saved["weights"][histogram["step"] - 1]
                low = values(histogram["linear_min"], "<f4")
                high = values(histogram["linear_max"], "<f4")
                np.testing.assert_allclose(low, [w.min() for w in weights], rtol=RTOL)
                np.testing.assert_allclose(high, [w.max() for w in weights], rtol=RTOL)


def test_reductions_are_batched_per_step_and_unsupported_placements_refused(fsdp_run):
    saved, _ = fsdp_run
    # Unsampled step 2: one SUM (squared norms + format counts) and one MAX (abs-max), for
    # all four tensors together. Sampled steps add the range MAX and one SUM per histogram kind.
    assert saved["collectives"][1] == 2
    assert saved["collectives"][0] == saved["collectives"][2] == 2 + 2 * 2 + 2
    assert "Partial" in saved["refusal"]


def _accumulate(rank: int, port: int, spool_root: str, root: str) -> None:
    """Two optimizer steps of two micro-batches each, gradient sync off for the first: in
    float32, and with bf16 parameters reduced in float32 (FSDP keeps the sum in float32)."""
    sys.path.insert(0, root)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import init_device_mesh

    import numwatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        saved: dict[str, list[float]] = {}
        for name, policy in (
            ("fp32", MixedPrecisionPolicy()),
            ("bf16", MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)),
        ):
            model = _model()
            reference = _model()
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            watcher = numwatch.watch(model, optimizer, run=f"accumulate-{name}", spool_dir=spool_root)
            own_norms = []
            for step in (1, 2):
                weights = [p.full_tensor().detach() for p in model.parameters()]  # collectives, every rank
                with torch.no_grad():
                    for parameter, weight in zip(reference.parameters(), weights, strict=True):
                        parameter.copy_(weight)
                own = [torch.zeros_like(p, dtype=torch.float64) for p in reference.parameters()]
                for micro in (0, 1):
                    inputs, targets = _batch(10 * step + micro)
                    mine = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
                    model.set_requires_gradient_sync(micro == 1)
                    (torch.nn.functional.mse_loss(model(inputs[mine]), targets[mine]) / 2).backward()
                    loss = torch.nn.functional.mse_loss(reference(inputs[mine]), targets[mine]) / 2
                    for sum_, grad in zip(own, torch.autograd.grad(loss, list(reference.parameters())), strict=True):
                        sum_ += grad.double()
                optimizer.step()
                optimizer.zero_grad()
                own_norms.append(float(torch.linalg.vector_norm(torch.cat([g.ravel() for g in own]))))
            watcher.close()
            saved[name] = own_norms
        torch.save(saved, Path(spool_root) / f"accumulate{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_with_gradient_sync_off_the_local_gradient_is_the_ranks_sum_over_its_micro_batches(tmp_path):
    spawn_ranks(_accumulate, tmp_path)
    for rank in range(WORLD_SIZE):
        saved = torch.load(tmp_path / f"accumulate{rank}.pt", weights_only=False)
        for name, rtol in (("fp32", RTOL), ("bf16", 2e-2)):
            (run_dir,) = tmp_path.glob(f"accumulate-{name}.*")
            steps = read_spool(run_dir / f"rank{rank}").steps
            assert [s["step"] for s in steps] == [1, 2]  # one step per optimizer step
            for step, expected in zip(steps, saved[name], strict=True):
                assert step["local"]["grad_norm"] == pytest.approx(expected, rel=rtol), (name, rank, step["step"])
