"""Training-step overhead of numwatch.watch: aten ops added per step, and paired step-time ratios.

    python benchmarks/overhead.py [--steps 100] [--device cuda --d-model 1024 --layers 8]
    python benchmarks/overhead.py --ops [--layers 4 16]

A GPT-style transformer (default 4 layers, d_model 256) is trained on ``--device`` (CPU by
default) in fp32 and under bf16 autocast.

``--ops`` counts the aten ops the training thread dispatches in one step (a
``TorchDispatchMode``: device independent, robust on a loaded machine) with and without the
watcher, for each kind of step, on each ``--layers`` model; the difference is what the
watcher adds. Targets: a sampled step under 300 ops, and the same count (within 10%) for a
model with 4x the tensors.

Otherwise, per watcher configuration, two identical copies of the model (same weights, same
batches) take alternating steps in one process, the watcher attached to one of them for the
whole run (after a throwaway watcher ran first, so one-time costs such as cached layouts are
not counted), so drift in machine load hits both alike. Printed: mean ratio = total watched
time / total unwatched time over all ``--steps`` steps (with the defaults' cadences, 100
steps hold one sampled step and two format-count steps; ``--uniform-steps`` for the
configurations whose every step is alike), the median of the per-step ratios,
and the median ratio of the sampled steps alone. The "collector ..." rows stream to a real
collector (``numwatch serve`` on loopback) and to a port where none listens (everything
spools, retries back off); the down case should add at most 1 ms per step over the healthy
one. They need the collector's dependencies (``numwatch[server]``); ``--no-collector``
leaves them out. On CUDA each timed step ends with a synchronize, so the time includes the
GPU's work, watched and unwatched alike.
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import numwatch
from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "format counts every step": {"format_every": 1},
    "histograms every step": {"histogram_every": 1},
    "activation tracing": {"trace_activations": True},
    "forward stats every step": {"attention_every": 1},
    "collector healthy": {"url": "healthy"},
    "collector down": {"url": "down"},
}

# Step kinds for --ops: each watcher configuration makes every step one kind.
OP_KINDS: dict[str, dict] = {
    "every step (norms only)": {"histogram_every": 0, "format_every": 0},
    "format-count step": {"histogram_every": 0, "format_every": 1},
    "sampled step": {"histogram_every": 1, "format_every": 0},
    "sampled + format-count step": {"histogram_every": 1, "format_every": 1},
    "activation tracing step": {"histogram_every": 0, "format_every": 0, "trace_activations": True},
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched on this thread while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model copy, its optimizer and its batch stream."""

    def __init__(
        self, model: torch.nn.Module, cfg: GPTConfig, batch_size: int, autocast_dtype, device: torch.device
    ) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.batches = synthetic_batches(cfg, batch_size, seed=1)
        self.autocast_dtype = autocast_dtype
        self.device = device

    def step(self) -> float:
        inputs, targets = (t.to(self.device) for t in next(self.batches))
        _synchronize(self.device)
        start = time.perf_counter()
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with ctx:
            loss = lm_loss(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        return time.perf_counter() - start

    def counted_step(self) -> collections.Counter[str]:
        with OpCounter() as counter:
            self.step()
        return counter.counts


def _pair(cfg: GPTConfig, batch_size: int, autocast_dtype, device: torch.device) -> tuple[Trainer, Trainer]:
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device)
    return Trainer(model, cfg, batch_size, autocast_dtype, device), Trainer(
        copy.deepcopy(model), cfg, batch_size, autocast_dtype, device
    )


def _config(args: argparse.Namespace, layers: int) -> GPTConfig:
    return GPTConfig(d_model=args.d_model, n_layers=layers, context=args.context, n_heads=max(4, args.d_model // 64))


def _spool(root: str) -> str:
    return tempfile.mkdtemp(dir=root)


def count_ops(args: argparse.Namespace, spool: str) -> None:
    """Aten ops the watcher adds per step, by step kind, per model size and precision."""
    device = torch.device(args.device)
    print(
        f"aten ops added per step by the watcher (watched step - unwatched step; torch {torch.__version__}, "
        f"{args.device})",
        flush=True,
    )
    print(f"{'precision':<10} {'layers':>6} {'tensors':>8} " + " ".join(f"{kind:>28}" for kind in OP_KINDS))
    for precision, dtype in _precisions(args):
        for layers in args.layers:
            cfg = _config(args, layers)
            added = []
            for kind, variant in OP_KINDS.items():
                base, watched = _pair(cfg, 2, dtype, device)
                for trainer in (base, watched):  # Adam state exists from the second step on
                    trainer.step()
                with numwatch.watch(
                    watched.model,
                    watched.optimizer,
                    run=f"ops-{time.monotonic_ns()}",
                    spool_dir=_spool(spool),
                    **variant,
                ):
                    watched.step()  # first step: cached layouts and tables are built
                    base_ops, watched_ops = base.counted_step(), watched.counted_step()
                extra = watched_ops - base_ops
                added.append(sum(watched_ops.values()) - sum(base_ops.values()))
                if args.ops_detail:
                    print(f"  {precision} {layers} layers, {kind}: {dict(extra.most_common())}")
            tensors = sum(1 for p in base.model.parameters() if p.requires_grad)
            print(f"{precision:<10} {layers:>6} {tensors:>8} " + " ".join(f"{n:>28}" for n in added), flush=True)


def _ratios(base: list[float], watched: list[float]) -> list[float]:
    return [w / b for b, w in zip(base, watched, strict=True)]


def measure(variant: dict, autocast_dtype, batch_size: int, args: argparse.Namespace, spool: str) -> dict[str, float]:
    """Paired alternating steps; mean and median ratios, and the median ratio of the sampled steps."""
    device = torch.device(args.device)
    base, watched = _pair(_config(args, args.layers[0]), batch_size, autocast_dtype, device)
    for trainer in (base, watched):  # allocator and first-call costs are not measured
        trainer.step()
        trainer.step()
    throwaway = {key: value for key, value in variant.items() if key != "url"}
    with numwatch.watch(
        watched.model,
        watched.optimizer,
        run=f"warm-{time.monotonic_ns()}",
        spool_dir=_spool(spool),
        **{**throwaway, "histogram_every": 1, "format_every": 1},
    ):
        base.step()
        watched.step()
    base_times: list[float] = []
    watched_times: list[float] = []
    # Configurations whose steps are all alike need fewer steps than the defaults' 100-step window.
    steps = args.steps if not ({"histogram_every", "format_every"} & set(variant)) else args.uniform_steps
    with numwatch.watch(
        watched.model, watched.optimizer, run=f"bench-{time.monotonic_ns()}", spool_dir=_spool(spool), **variant
    ) as watcher:
        for _ in range(steps):
            base_times.append(base.step())
            watched_times.append(watched.step())
        histogram_every = watcher.histogram_every
    ratios = _ratios(base_times, watched_times)
    sampled = [ratio for step, ratio in enumerate(ratios, 1) if histogram_every and (step - 1) % histogram_every == 0]
    return {
        "base_ms": statistics.mean(base_times) * 1e3,
        "watched_ms": statistics.mean(watched_times) * 1e3,
        "mean": sum(watched_times) / sum(base_times),
        "median": statistics.median(ratios),
        "sampled": statistics.median(sampled) if sampled else float("nan"),
    }


def _precisions(args: argparse.Namespace):
    table = {"fp32": None, "bf16": torch.bfloat16}
    return [(name, table[name]) for name in args.precisions]


def time_steps(args: argparse.Namespace, spool: str, resources: ExitStack) -> None:
    print(
        f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} CPU threads; d_model {args.d_model}, "
        f"{args.layers[0]} layers, "
        f"context {args.context}; paired alternating steps: {args.steps} per row, {args.uniform_steps} for 'every "
        "step' rows"
    )
    print(
        f"{'precision':<10} {'configuration':<26} {'unwatched ms':>12} {'watched ms':>11} {'mean':>7} {'median':>7} "
        f"{'sampled':>8}"
    )
    variants = {
        name: variant
        for name, variant in VARIANTS.items()
        if not (args.no_collector and "url" in variant) and (not args.only or name in args.only)
    }
    if any("url" in variant for variant in variants.values()):
        from numwatch.monitor import stack  # the collector's dependencies are needed only here

        urls = {
            "healthy": resources.enter_context(stack.running_collector(Path(spool))),
            "down": f"http://127.0.0.1:{stack.free_port()}",
        }
    for precision, dtype in _precisions(args):
        batch = args.batch if dtype is None else args.bf16_batch
        added: dict[str, float] = {}
        for name, variant in variants.items():
            if "url" in variant:
                variant = {**variant, "url": urls[variant["url"]]}
            result = measure(variant, dtype, batch, args, spool)
            added[name] = result["watched_ms"] - result["base_ms"]
            print(
                f"{precision:<10} {name:<26} {result['base_ms']:>12.2f} {result['watched_ms']:>11.2f} "
                f"{result['mean']:>6.3f}x {result['median']:>6.3f}x "
                f"{result['sampled']:>7.3f}x",
                flush=True,
            )
        if "collector down" in added:
            print(
                f"{precision:<10} collector down - healthy: "
                f"{added['collector down'] - added['collector healthy']:+.2f} ms per step (target <= 1 ms)",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true", help="count the aten ops added per step instead of timing")
    parser.add_argument("--ops-detail", action="store_true", help="with --ops: the added ops by name")
    parser.add_argument("--steps", type=int, default=100, help="paired steps per configuration")
    parser.add_argument("--uniform-steps", type=int, default=30, help="paired steps for 'every step' configurations")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)"
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--bf16-batch", type=int, default=2, help="batch size under bf16 autocast (CPU bf16 matmul is slow)"
    )
    parser.add_argument("--batch", type=int, default=16, help="batch size in fp32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="timing: the first; --ops: each (default 4 16)"
    )
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--no-collector", action="store_true", help="leave out the rows that stream to a collector")
    parser.add_argument(
        "--only", action="append", choices=list(VARIANTS), help="time only this configuration (repeatable)"
    )
    args = parser.parse_args()
    args.layers = args.layers or ([4, 16] if args.ops else [4])
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as spool, ExitStack() as resources:
        if args.ops:
            count_ops(args, spool)
        else:
            time_steps(args, spool, resources)


if __name__ == "__main__":
    main()
