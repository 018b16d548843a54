"""Cost of the optimizer-health and quantization-readiness measurements against a training step.

    python benchmarks/health_cost.py [--device cuda] [--repeats 5]

For the overhead benchmark's model (GPT-style, d_model 256, 4 layers) and a ~100M-parameter
one (d_model 1024, 8 layers), trained in fp32 with AdamW: a training step, ``adam_health``
over every parameter (what a sampled step adds) and ``quantization_sqnr`` over every
parameter, all four schemes (what a ``quant_every`` step and ``close()`` add), timed in
turn within each repeat, so that a load on the machine weighs on all three alike. Printed:
the median over repeats of each cost / the same repeat's step, by wall-clock time and (CPU)
by this process's CPU time, which waiting for a core shared with other jobs does not count.
Target: a quantization step costs less than one training step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches
from numwatch.kernels.optim_health import adam_health
from numwatch.kernels.quantization import quantization_sqnr

MODELS = {"benchmark (d256 x4)": (256, 4, 16), "~100M (d1024 x8)": (1024, 8, 8)}  # d_model, layers, batch


def timed(work: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``work``, synchronised on CUDA so the device's time counts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__} on {device}, {torch.get_num_threads()} CPU threads; fp32, AdamW; medians of "
        f"{args.repeats} repeats"
    )
    print(
        f"{'model':<20} {'params':>7} {'step ms':>9} {'adam ms':>9} {'adam/step':>10} {'(CPU)':>7} {'quant ms':>9} "
        f"{'quant/step':>11} {'(CPU)':>7}"
    )
    for name, (d_model, layers, batch) in MODELS.items():
        cfg = GPTConfig(d_model=d_model, n_layers=layers, context=args.context, n_heads=max(4, d_model // 64))
        measure(name, cfg, batch, device, args.repeats)


def measure(name: str, cfg: GPTConfig, batch: int, device: torch.device, repeats: int) -> None:
    """Time a training step, the Adam-health pass and the quantization pass of one model; print a row."""
    torch.manual_seed(0)
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
    adam_health(optimizer, parameters)
    quantization_sqnr(parameters)
    rows = []
    for _ in range(repeats):
        step = timed(train_step, device)
        adam = timed(lambda: adam_health(optimizer, parameters), device)
        quant = timed(lambda: quantization_sqnr(parameters), device)
        rows.append((step, adam, quant))

    def median(pick: Callable[[tuple], float]) -> float:
        return statistics.median(pick(row) for row in rows)

    count = sum(p.numel() for p in parameters)
    print(
        f"{name:<20} {count / 1e6:>6.1f}M {median(lambda r: r[0][0]) * 1e3:>9.1f}"
        f" {median(lambda r: r[1][0]) * 1e3:>9.1f}"
        f" {median(lambda r: r[1][0] / r[0][0]):>9.2f}x {median(lambda r: r[1][1] / r[0][1]):>6.2f}x"
        f" {median(lambda r: r[2][0]) * 1e3:>9.1f} {median(lambda r: r[2][0] / r[0][0]):>10.2f}x"
        f" {median(lambda r: r[2][1] / r[0][1]):>6.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    main()
