"""Cost of the optimizer-health and quantization-readiness measurements against a training step.

    python benchmarks/health_cost.py [--device cuda] [--repeats 3]

For the overhead benchmark's model (GPT-style, d_model 256, 4 layers) and a ~100M-parameter
one (d_model 1024, 8 layers), trained in fp32 with AdamW: the median time of a training
step, of ``adam_health`` over every parameter (what a sampled step adds) and of
``quantization_sqnr`` over every parameter, all four schemes (what a ``quant_every`` step
and ``close()`` add). Targets: a quantization step costs less than one training step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from numwatch.monitor.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches
from numwatch.optim_health import adam_health
from numwatch.quantization import quantization_sqnr

MODELS = {"benchmark (d256 x4)": (256, 4, 16), "~100M (d1024 x8)": (1024, 8, 8)}  # d_model, layers, batch


def timed(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``work`` (synchronised on CUDA so the device's time counts)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} CPU threads; fp32, AdamW; median of {args.repeats}")
    print(f"{'model':<20} {'params':>8} {'step ms':>10} {'adam ms':>10} {'adam/step':>10} {'quant ms':>10} {'quant/step':>11}")
    for name, (d_model, layers, batch) in MODELS.items():
        torch.manual_seed(0)
        cfg = GPTConfig(d_model=d_model, n_layers=layers, context=args.context, n_heads=max(4, d_model // 64))
        model = TinyGPT(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batches = synthetic_batches(cfg, batch, seed=1)
        parameters = list(model.parameters())

        def train_step() -> None:
            inputs, targets = (t.to(device) for t in next(batches))
            lm_loss(model(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_step()  # warm-up; creates the Adam state
        step = timed(train_step, device, args.repeats)
        adam = timed(lambda: adam_health(optimizer, parameters), device, args.repeats)
        quant = timed(lambda: quantization_sqnr(parameters), device, args.repeats)
        count = sum(p.numel() for p in parameters)
        print(f"{name:<20} {count / 1e6:>7.1f}M {step * 1e3:>10.1f} {adam * 1e3:>10.1f} {adam / step:>9.2f}x {quant * 1e3:>10.1f} {quant / step:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
