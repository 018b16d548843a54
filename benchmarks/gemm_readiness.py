"""Cost of one gemm-readiness step (the low-precision readiness of every F.linear's X, W and dY) as a
fraction of a training step.

    python benchmarks/gemm_readiness.py [--rounds 7] [--device cpu] [--cases benchmark,d1024x8] [--rows 32]

Models: the benchmark GPT (TinyGPT: 4 layers, d_model 256, context 64, batch 16) and a d_model 1024 x
8 layers one (same context and batch). Paired and interleaved in one process: a training step
(forward, backward, AdamW) without and with numwatch's GemmProbe measuring it (exactly what a sampled
step adds: the F.linear interception, the batched measurement of X and W at the forward's end and of
dY at the step's end), each ended by reading the result (a device sync on accelerators). Prints the
medians, the added time as a fraction of the plain step, and what that costs per step at a cadence
of one sampled step in 100 (the default histogram_every). Wall times need a quiet machine: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from numwatch.capture.gemm import ROWS, GemmProbe
from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches

CASES = {
    "benchmark": GPTConfig(d_model=256, n_layers=4, n_heads=4, context=64),
    "d1024x8": GPTConfig(d_model=1024, n_layers=8, n_heads=16, context=64),
}
BATCH = 16
DEFAULT_CADENCE = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(cfg: GPTConfig, rounds: int, device: torch.device, rows: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = TinyGPT(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    failures: list[str] = []
    probe = GemmProbe(model, list(model.parameters()), due=lambda: measuring, failed=failures.append, rows=rows)
    batches = synthetic_batches(cfg, BATCH)
    measuring = False

    def step() -> float:
        x, y = (t.to(device) for t in next(batches))
        _sync(device)
        start = time.perf_counter()
        lm_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result = probe.take_step()
        if result is not None:
            result.cpu()  # what the step's host copy waits for
        _sync(device)
        return time.perf_counter() - start

    plain, measured = [], []
    for round_ in range(rounds + 1):  # the first round warms up
        for kind in ("plain", "measured") if round_ % 2 else ("measured", "plain"):
            measuring = kind == "measured"
            seconds = step()
            if round_:
                (measured if measuring else plain).append(seconds)
    probe.remove()
    assert not failures, failures
    base, with_probe = statistics.median(plain), statistics.median(measured)
    return {"step_s": base, "measured_s": with_probe, "added_s": with_probe - base, "fraction": with_probe / base - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rows", type=int, default=ROWS, help="gemm_rows: rows quantized per operand (0: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__} on {device}, {torch.get_num_threads()} CPU threads, gemm_rows {args.rows}; "
        f"load {os.getloadavg()}"
    )
    for name in args.cases.split(","):
        cfg = CASES[name]
        r = run_case(cfg, args.rounds, device, args.rows)
        params = sum(p.numel() for p in TinyGPT(cfg).parameters()) / 1e6
        print(
            f"{name} ({params:.1f}M parameters, {BATCH}x{cfg.context} tokens): step {r['step_s'] * 1e3:.0f} ms, "
            f"with gemm readiness {r['measured_s'] * 1e3:.0f} ms: +{r['added_s'] * 1e3:.0f} ms = "
            f"{r['fraction']:.2f} training steps; at 1 step in {DEFAULT_CADENCE}: "
            f"{100 * r['fraction'] / DEFAULT_CADENCE:.2f}% of training time"
        )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
