"""Host time the per-rank local-health probe adds to a DDP step (numwatch.capture.local_grads).

    python benchmarks/rank_probe.py [--steps 200] [--ranks 2]

Two gloo ranks on CPU train the benchmark model (``numwatch.demo_model.TinyGPT``, default
config) under DDP with the probe attached alone (no watcher): its communication hook measures
every bucket, its forward hooks start the compute clock, and ``take()`` gathers the step's
parts. Printed per configuration (median over ``--steps`` steps after a warm-up, rank 0):

- ops: the aten ops the probe dispatches per step (a dispatch mode counting inside the probe
  only; device independent);
- probe time: wall time inside the probe's hooks and ``take()`` per step. On CPU it includes the
  kernels' work (a pass over the gradients for the norms; NaN/Inf elements are counted only in a
  bucket whose norm is not finite);
- host time: the same with every parameter shrunk to one element (same parameters, same bucket
  layout), where the kernels' work vanishes: what is left is the Python and dispatch time the
  probe adds on the host, which on a GPU is what a step pays (kernels run asynchronously there).

Configurations: the default (a communication hook), a user hook registered before ``watch`` (the
per-parameter fallback), and a sampled step (adds the replicas' checksum). "hook calls" is how
often the probe measured per step (buckets, or parameters for the fallback; the shrunk model
has one bucket). Target: host time of the default at most 0.3 ms per step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support from a checkout

from numwatch.capture.local_grads import LocalGradProbe  # noqa: E402
from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches  # noqa: E402
from tests.support.ddp import spawn  # noqa: E402

WARMUP = 10


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class Timed:
    """Wall time spent inside the probe's entry points (and, optionally, the ops they dispatch)."""

    def __init__(self, probe: LocalGradProbe) -> None:
        self.seconds = 0.0
        self.calls: Counter[str] = Counter()
        self.counter: _Count | None = None
        for name in ("_measure", "_before_forward", "_before_ddp_forward", "take"):
            setattr(probe, name, self._wrap(name, getattr(probe, name)))

    def _wrap(self, name: str, function: Any) -> Any:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            began = time.perf_counter()
            try:
                if self.counter is not None:
                    with self.counter:
                        return function(*args, **kwargs)
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        return timed


def _shrink(model: nn.Module) -> None:
    """Every parameter down to one element: the same parameters and buckets, no kernel work to speak of."""
    with torch.no_grad():
        for module in model.modules():
            for name, parameter in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(parameter.reshape(-1)[:1].clone()))


def _measure(rank: int, world_size: int, steps: int, mode: str, tiny: bool) -> dict[str, float]:
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    if tiny:
        _shrink(model)
        inner = model

        class Tiny(nn.Module):  # the shrunk model's forward: every parameter used once, a scalar loss
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return sum(p.sum() for p in self.inner.parameters()) * x.float().mean()

        model = Tiny()
    ddp = DDP(model)
    if mode == "hook before watch":
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # a user's own hook, in Python
    sampled = mode == "sampled step"
    probe = LocalGradProbe(ddp, lambda: sampled, lambda site, function: function)
    timer = Timed(probe)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    batches = synthetic_batches(cfg, 8, seed=rank)
    per_step, ops = [], Counter()
    for step in range(WARMUP + steps):
        x, y = next(batches)
        counting = step == WARMUP
        timer.counter = _Count() if counting else None
        before = timer.seconds
        out = ddp(x)
        loss = out if tiny else lm_loss(out, y)
        loss.backward()
        probe.take()
        optimizer.step()
        optimizer.zero_grad()
        if counting:
            ops = timer.counter.ops  # type: ignore[union-attr]
        elif step >= WARMUP:
            per_step.append(timer.seconds - before)
    probe.remove()
    calls = timer.calls["_measure"] / (WARMUP + steps)
    return {"ms": 1e3 * statistics.median(per_step), "ops": float(sum(ops.values())), "calls": calls}


MODES = ("comm hook (default)", "hook before watch", "sampled step")


def _rank(rank: int, world_size: int, steps: int, out: str) -> None:
    rows = []
    for mode in MODES:
        full = _measure(rank, world_size, steps, mode, tiny=False)
        tiny = _measure(rank, world_size, steps, mode, tiny=True)
        rows.append((mode, full, tiny))
    if rank == 0:
        header = f"{'configuration':24} {'ops/step':>9} {'hook calls':>10} {'probe time ms':>14} {'host time ms':>13}"
        lines = [header]
        for mode, full, tiny in rows:
            lines.append(f"{mode:24} {full['ops']:9.0f} {full['calls']:10.0f} {full['ms']:14.3f} {tiny['ms']:13.3f}")
        Path(out).write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    out = Path("rank_probe.txt").resolve()
    spawn(_rank, args.ranks, args.steps, str(out))
    print(f"TinyGPT {GPTConfig()}, {args.ranks} gloo ranks on CPU, median over {args.steps} steps (rank 0)")
    print(out.read_text(), end="")
    out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
