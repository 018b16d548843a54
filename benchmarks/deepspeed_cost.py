"""Per-step cost numwatch adds under DeepSpeed ZeRO-2 and ZeRO-3, and under DDP and FSDP2 on the same model.

    python benchmarks/deepspeed_cost.py [--steps 100] [--repeat 2] [--setups ddp fsdp2 zero2 zero3]
    python benchmarks/deepspeed_cost.py --ops

Two gloo ranks on the CPU (``DS_ACCELERATOR=cpu``, one torch thread each) train the benchmark
model (:class:`numwatch.demo_model.TinyGPT`, d_model 256, 4 layers, fp32, AdamW, gradient
clipping 1.0) under each setup (FSDP2: ``fully_shard`` on each block and on the model).
As in ``benchmarks/overhead.py``: two identical copies (same
weights, same batches) take alternating steps, numwatch attached to one of them at its default
cadences (after a throwaway watcher ran first, so one-time costs are not counted), so drift in
machine load hits both alike. Rank 0 prints, per setup and run: the mean step times, the mean
ratio (total watched time / total unwatched time) and the median of the per-step ratios.
Each step ends with the optimizer's update and waits for no one else: both copies' collectives
keep the ranks in step.

``--ops`` counts instead the aten ops the training thread dispatches in one step (a
``TorchDispatchMode``: independent of the machine's load) with and without the watcher, for a
regular step and a sampled one (``histogram_every=1``); the difference is what numwatch adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support from a checkout

from numwatch.monitor.ops.stack import free_port  # noqa: E402
from tests.support.deepspeed_ranks import WORLD_SIZE, init_deepspeed  # noqa: E402

BATCH = 8  # per rank


class Copy:
    """One model copy under one setup: its step function and its batch stream."""

    def __init__(self, model: torch.nn.Module, step: Callable[[torch.Tensor, torch.Tensor], None], seed: int) -> None:
        from numwatch.demo_model import GPTConfig, synthetic_batches

        self.model = model
        self._step = step
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = synthetic_batches(GPTConfig(), BATCH, seed=seed)

    def step(self) -> float:
        inputs, targets = next(self.batches)
        start = time.perf_counter()
        self._step(inputs, targets)
        return time.perf_counter() - start


def _ddp_copy(model: torch.nn.Module, seed: int) -> tuple[Copy, tuple[Any, ...]]:
    return _torch_copy(torch.nn.parallel.DistributedDataParallel(model), seed)


def _torch_copy(wrapped: torch.nn.Module, seed: int) -> tuple[Copy, tuple[Any, ...]]:
    """A torch-wrapped model's copy: backward, ``clip_grad_norm_``, AdamW step, as a torch loop does."""
    from numwatch.demo_model import lm_loss

    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        lm_loss(wrapped(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Copy(wrapped, step, seed), (wrapped, optimizer)


def _fsdp_copy(model: torch.nn.Module, seed: int) -> tuple[Copy, tuple[Any, ...]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for block in model.blocks:  # type: ignore[union-attr]  # TinyGPT's transformer blocks
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _torch_copy(model, seed)


def _zero_copy(stage: int) -> Callable[[torch.nn.Module, int], tuple[Copy, tuple[Any, ...]]]:
    def make(model: torch.nn.Module, seed: int) -> tuple[Copy, tuple[Any, ...]]:
        import deepspeed

        from numwatch.demo_model import lm_loss

        config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage},
            "steps_per_print": 1 << 30,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
            engine.backward(lm_loss(engine(inputs), targets))
            engine.step()

        return Copy(engine, step, seed), (engine,)

    return make


SETUPS = {"ddp": _ddp_copy, "fsdp2": _fsdp_copy, "zero2": _zero_copy(2), "zero3": _zero_copy(3)}


def _measure(make: Callable[[torch.nn.Module, int], tuple[Copy, tuple[Any, ...]]], steps: int, spool: str) -> dict:
    import numwatch
    from numwatch.demo_model import TinyGPT

    # Identical copies built from one seed (ZeRO-3 partitions a model in place: no deepcopy after).
    base, _ = make(_seeded(TinyGPT), 1)
    watched, target = make(_seeded(TinyGPT), 1)
    for trainer in (base, watched):  # allocator and first-call costs are not measured
        trainer.step()
        trainer.step()
    with numwatch.watch(*target, run=f"warm-{time.monotonic_ns()}", spool_dir=tempfile.mkdtemp(dir=spool)):
        base.step()
        watched.step()
    base_times, watched_times = [], []
    with numwatch.watch(*target, run=f"bench-{time.monotonic_ns()}", spool_dir=tempfile.mkdtemp(dir=spool)):
        for _ in range(steps):
            base_times.append(base.step())
            watched_times.append(watched.step())
    ratios = [w / b for b, w in zip(base_times, watched_times, strict=True)]
    return {
        "base_ms": statistics.mean(base_times) * 1e3,
        "watched_ms": statistics.mean(watched_times) * 1e3,
        "mean": sum(watched_times) / sum(base_times),
        "median": statistics.median(ratios),
    }


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build()


def _count_ops(make: Callable[[torch.nn.Module, int], tuple[Copy, tuple[Any, ...]]], spool: str) -> list[int]:
    """Aten ops numwatch adds to one regular step and to one sampled step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import numwatch
    from numwatch.demo_model import TinyGPT

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def ops(trainer: Copy) -> int:
        with Counter() as counter:
            trainer.step()
        return counter.ops

    added = []
    for histogram_every in (0, 1):
        base, _ = make(_seeded(TinyGPT), 1)
        watched, target = make(_seeded(TinyGPT), 1)
        for trainer in (base, watched):  # Adam state exists from the second step on
            trainer.step()
            trainer.step()
        options = {"histogram_every": histogram_every, "format_every": 0, "quant_every": 0}
        with numwatch.watch(
            *target, run=f"ops-{time.monotonic_ns()}", spool_dir=tempfile.mkdtemp(dir=spool), **options
        ):
            watched.step()  # cached layouts and tables are built
            added.append(ops(watched) - ops(base))
    return added


def _rank(rank: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    status = 1
    try:
        init_deepspeed(rank, port)  # DeepSpeed's environment, gloo, no shared-memory op build
        with tempfile.TemporaryDirectory() as spool:
            for name in args.setups if args.ops else ():
                regular, sampled = _count_ops(SETUPS[name], spool)
                if rank == 0:
                    print(f"{name:<6} {regular:>14} {sampled:>14}", flush=True)
            for run in range(1, 0 if args.ops else args.repeat + 1):
                for name in args.setups:
                    result = _measure(SETUPS[name], args.steps, spool)
                    if rank == 0:
                        print(
                            f"run {run}  {name:<6} {result['base_ms']:>12.1f} {result['watched_ms']:>11.1f} "
                            f"{result['mean']:>6.3f}x {result['median']:>6.3f}x",
                            flush=True,
                        )
        dist.barrier()
        status = 0
    finally:
        sys.stdout.flush()
        os._exit(status)  # gloo may abort at interpreter exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="paired steps per setup and run")
    parser.add_argument("--repeat", type=int, default=2, help="runs of every setup")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--ops", action="store_true", help="count the aten ops added per step instead of timing")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {WORLD_SIZE} gloo ranks on the CPU, 1 thread each; TinyGPT d_model 256, "
        f"4 layers, batch {BATCH} per rank, fp32; {args.steps} paired alternating steps per row; load {os.getloadavg()}"
    )
    if args.ops:
        print(f"{'aten ops added per step':<7} {'regular step':>14} {'sampled step':>14}")
    else:
        print(f"{'':<12}{'unwatched ms':>12} {'watched ms':>11} {'mean':>7} {'median':>7}")
    mp.spawn(_rank, args=(free_port(), args), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
