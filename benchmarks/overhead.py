"""Training-step overhead of numwatch.watch against an uninstrumented baseline, same process.

    python benchmarks/overhead.py [--rounds 10 --steps 10] [--variants defaults] [--device cuda --d-model 1024 --layers 8]

A GPT-style transformer (default 4 layers, d_model 256) is trained on ``--device`` (CPU by
default) in fp32 and under bf16 autocast. For each watcher configuration, a baseline model and a watched copy are
stepped in interleaved blocks (baseline block, watched block, ...) so drift in machine
load hits both alike. Two ratios: median(watched step) / median(baseline step), and the
mean over all measured steps, whose window (default 100 steps after the warm-up) holds the
sampled steps: a histogram step (``histogram_every=100``) and two format-count steps
(``format_every=50``), which the median leaves out. Targets: defaults <= 1.03x by both,
activation tracing <= 1.05x. The "collector ..."
rows stream to a real collector (``numwatch serve`` on loopback) and to a port where none
listens (everything spools, retries back off); the down case should add at most 1 ms
per step over the healthy one. They need the collector's dependencies (``numwatch[server]``);
``--no-collector`` leaves them out (e.g. on a GPU machine with torch only). On CUDA each timed
step ends with a synchronize, so the time includes the GPU's work, watched and baseline alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch


import numwatch  # noqa: E402
from numwatch.monitor.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches  # noqa: E402

VARIANTS: dict[str, dict] = {
    "defaults": {},
    "format counts every step": {"format_every": 1},
    "histograms every step": {"histogram_every": 1},
    "activation tracing": {"trace_activations": True},
    "collector healthy": {"url": "healthy"},
    "collector down": {"url": "down"},
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(model, optimizer, batches, n: int, autocast_dtype, device: torch.device) -> list[float]:
    times = []
    for _ in range(n):
        inputs, targets = (t.to(device) for t in next(batches))
        _synchronize(device)
        start = time.perf_counter()
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with ctx:
            loss = lm_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure(variant: dict, autocast_dtype, batch_size: int, args: argparse.Namespace, spool: str) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = GPTConfig(d_model=args.d_model, n_layers=args.layers, context=args.context, n_heads=max(4, args.d_model // 64))
    base_model = TinyGPT(cfg).to(device)
    watched_model = copy.deepcopy(base_model)
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=1e-3)
    watched_opt = torch.optim.AdamW(watched_model.parameters(), lr=1e-3)
    base_batches = synthetic_batches(cfg, batch_size, seed=1)
    watched_batches = synthetic_batches(cfg, batch_size, seed=1)
    base_times: list[float] = []
    watched_times: list[float] = []
    # A fresh spool and run name per configuration: a spool left by one must not drain into the next.
    run = f"bench-{time.monotonic_ns()}"
    with numwatch.watch(watched_model, watched_opt, run=run, spool_dir=tempfile.mkdtemp(dir=spool), **variant):
        # warm-up (allocator, first-call overheads, thread start) is not measured
        step_times(base_model, base_opt, base_batches, 2, autocast_dtype, device)
        step_times(watched_model, watched_opt, watched_batches, 2, autocast_dtype, device)
        for _ in range(args.rounds):
            base_times += step_times(base_model, base_opt, base_batches, args.steps, autocast_dtype, device)
            watched_times += step_times(watched_model, watched_opt, watched_batches, args.steps, autocast_dtype, device)
    return base_times, watched_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved blocks per configuration")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="configurations to run (default: all)")
    parser.add_argument("--bf16-batch", type=int, default=2, help="batch size under bf16 autocast (CPU bf16 matmul is slow)")
    parser.add_argument("--batch", type=int, default=16, help="batch size in fp32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--no-collector", action="store_true", help="leave out the rows that stream to a collector")
    args = parser.parse_args()
    print(f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} CPU threads; d_model {args.d_model}, {args.layers} layers, "
          f"context {args.context}; {args.rounds} x {args.steps} steps interleaved per configuration, same process")
    print(f"{'precision':<10} {'configuration':<26} {'baseline ms':>12} {'watched ms':>11} {'median':>7} {'mean':>7} {'added ms':>9}")
    with tempfile.TemporaryDirectory() as spool, ExitStack() as resources:
        variants = {name: VARIANTS[name] for name in args.variants if not (args.no_collector and "url" in VARIANTS[name])}
        if any("url" in variant for variant in variants.values()):
            from numwatch.monitor import stack  # the collector's dependencies are needed only here

            urls = {"healthy": resources.enter_context(stack.running_collector(Path(spool))), "down": f"http://127.0.0.1:{stack.free_port()}"}
        for precision, dtype, batch in (("fp32", None, args.batch), ("bf16", torch.bfloat16, args.bf16_batch)):
            added: dict[str, float] = {}
            for name, variant in variants.items():
                if "url" in variant:
                    variant = {**variant, "url": urls[variant["url"]]}
                base_times, watched_times = measure(variant, dtype, batch, args, spool)
                base, watched = statistics.median(base_times), statistics.median(watched_times)
                mean_ratio = statistics.fmean(watched_times) / statistics.fmean(base_times)
                added[name] = (watched - base) * 1e3
                print(f"{precision:<10} {name:<26} {base * 1e3:>12.2f} {watched * 1e3:>11.2f} {watched / base:>6.3f}x {mean_ratio:>6.3f}x {added[name]:>+9.2f}", flush=True)
            if "collector down" in added:
                print(f"{precision:<10} collector down - healthy: {added['collector down'] - added['collector healthy']:+.2f} ms per step (target <= 1 ms)", flush=True)


if __name__ == "__main__":
    main()
