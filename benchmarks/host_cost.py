"""Host time numwatch adds to a training step, with almost no compute to hide it.

    python benchmarks/host_cost.py [--steps 400] [--tensors 300] [--profile]

A model of 150 ``nn.Linear(4, 4)`` (300 parameter tensors) on one CPU thread: its step is
nearly all Python and dispatch, which is what the host spends per step on a GPU, where this
time sits on the critical path of small and medium models. Two identical copies take
alternating steps (the order swapped every pair, so drift in machine load hits both alike),
the watcher, at its default cadences, on one of them. Printed per run: the unwatched step
time, the median and the mean of the per-pair differences (ms per step; the mean includes
the sampled and format-count steps), the median added CPU time of the training thread
(``time.thread_time``: steadier than wall time on a loaded machine), and the CPU time of
numwatch's sender thread per step (``pthread_getcpuclockid``: the thread that encodes and
writes the documents). Target:
median at most 0.5 ms per step. ``--profile`` prints the watched steps' cProfile instead.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import tempfile
import threading
import time

import torch
from torch import nn

import numwatch


class Copy:
    """One model copy and its optimizer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.inputs = torch.randn(2, 4)

    def step(self) -> tuple[float, float]:
        """(wall seconds, this thread's CPU seconds) of one training step."""
        start, cpu = time.perf_counter(), time.thread_time()
        self.model(self.inputs).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.thread_time() - cpu


def _model(tensors: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(4, 4) for _ in range(tensors // 2)))


def _sender_threads(before: set[int]) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.ident not in before]


def _cpu_seconds(threads: list[threading.Thread]) -> float:
    total = 0.0
    for thread in threads:
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))  # type: ignore[arg-type]
        except (OSError, TypeError):
            pass  # the thread ended
    return total


def run(steps: int, tensors: int, spool: str, profile: bool) -> dict[str, float]:
    base, watched = Copy(_model(tensors)), Copy(copy.deepcopy(_model(tensors)))
    for trainer in (base, watched):
        for _ in range(3):
            trainer.step()
    existing = {thread.ident for thread in threading.enumerate()}
    with numwatch.watch(watched.model, watched.optimizer, spool_dir=tempfile.mkdtemp(dir=spool)) as watcher:
        watched.step()  # first step: cached layouts and tables are built
        senders = _sender_threads(existing)
        sender_before = _cpu_seconds(senders)
        differences, cpu_differences, base_times = [], [], []
        profiler = cProfile.Profile() if profile else None
        for pair in range(steps):
            if pair % 2:
                base_time = base.step()
                if profiler is not None:
                    profiler.enable()
                watched_time = watched.step()
                if profiler is not None:
                    profiler.disable()
            else:
                if profiler is not None:
                    profiler.enable()
                watched_time = watched.step()
                if profiler is not None:
                    profiler.disable()
                base_time = base.step()
            differences.append(watched_time[0] - base_time[0])
            cpu_differences.append(watched_time[1] - base_time[1])
            base_times.append(base_time[0])
        watcher.flush()
        sender = _cpu_seconds(senders) - sender_before
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return {
        "unwatched_ms": statistics.median(base_times) * 1e3,
        "median_ms": statistics.median(differences) * 1e3,
        "mean_ms": statistics.mean(differences) * 1e3,
        "cpu_median_ms": statistics.median(cpu_differences) * 1e3,
        "sender_ms": sender / steps * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="paired steps per run")
    parser.add_argument("--tensors", type=int, default=300, help="parameter tensors (two per Linear(4, 4))")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the watched steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; {args.tensors} tensors; {args.steps} paired steps per run")
    print(
        f"{'run':>3} {'unwatched ms':>12} {'added median ms':>15} {'added mean ms':>13} {'added CPU median ms':>19} "
        f"{'sender CPU ms/step':>18}"
    )
    with tempfile.TemporaryDirectory() as spool:
        for number in range(1, args.runs + 1):
            result = run(args.steps, args.tensors, spool, args.profile)
            print(
                f"{number:>3} {result['unwatched_ms']:>12.2f} {result['median_ms']:>15.3f} {result['mean_ms']:>13.3f} "
                f"{result['cpu_median_ms']:>19.3f} {result['sender_ms']:>18.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
