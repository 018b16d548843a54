"""Added cost of one sampled step's forward-pass statistics (max attention logit per call, output log Z).

    python benchmarks/attention.py [--rounds 15]

The benchmark GPT (TinyGPT: 4 layers, d_model 256, nn.MultiheadAttention -> SDPA with an
additive causal mask) at the overhead benchmark's context (64, batch 16) and at a long
context (1024, batch 2). Paired and interleaved in one process: a training step (forward,
backward, AdamW) without and with the forward measured (numwatch's ForwardProbe, exactly what
a sampled step adds), and, for scale, the model's own attention (the SDPA calls alone, with the
same q, k, v shapes and mask). Prints medians, the added time per sampled step against the
step and against the attention forward, what that costs per step at the default cadence
(every 100 steps), and the largest tensor the measurement allocates (the chunk bound) next to
the full B x H x T x T float32 logit matrix it never builds. Wall times need a quiet machine;
the matmul FLOPs (torch's FlopCounterMode on the step with and without the measurement; the
attention forward's q.k and p.v counted by hand) do not depend on load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from numwatch.capture.attention import LOGIT_CHUNK_ELEMENTS, max_attention_logit
from numwatch.capture.forward_probe import ForwardProbe
from numwatch.capture.output_logits import LogZ
from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches

CASES = {"d256 x 4 layers, T=64, batch 16": (64, 16), "d256 x 4 layers, T=1024, batch 2": (1024, 2)}
DEFAULT_CADENCE = 100


class LargestAllocation(TorchDispatchMode):
    """The largest tensor any op produces while active (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def run_case(context: int, batch: int, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = GPTConfig(context=context)
    model = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = next(synthetic_batches(cfg, batch))
    measured = [False]
    failures: list[str] = []
    probe = ForwardProbe(model, lambda: measured[0], failures.append)
    heads, d = cfg.n_heads, cfg.d_model
    q, k, v = (torch.randn(batch, heads, context, d // heads) for _ in range(3))
    mask = model.causal_mask[:context, :context]

    def step(with_probe: bool) -> None:
        measured[0] = with_probe
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe.take_step()

    def attention() -> None:
        with torch.no_grad():
            for _ in range(cfg.n_layers):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    for warm in (False, True, False):
        step(warm)
    flops = {}
    for name, work in (("step", lambda: step(False)), ("sampled", lambda: step(True))):
        with FlopCounterMode(display=False) as counter:
            work()
        flops[name] = counter.get_total_flops()
    # FlopCounterMode does not count the CPU SDPA kernel: q.k and p.v, 2 FLOPs per multiply-add each.
    flops["attention"] = cfg.n_layers * 2 * 2 * batch * heads * context * context * (d // heads)
    plain, watched, sdpa = [], [], []
    for _ in range(rounds):
        plain.append(timed(lambda: step(False)))
        watched.append(timed(lambda: step(True)))
        sdpa.append(timed(attention))
    assert not failures, failures
    probe.remove()
    with torch.no_grad():
        logits = model(inputs)
    largest = LargestAllocation()
    with largest:  # what one layer's measurement and the log Z allocate, inputs aside
        max_attention_logit(q, k, attn_mask=mask)
        LogZ().add(logits)
    base, with_probe, attn = statistics.median(plain), statistics.median(watched), statistics.median(sdpa)
    return {
        "step_ms": base * 1e3,
        "sampled_ms": with_probe * 1e3,
        "added_ms": (with_probe - base) * 1e3,
        "attention_ms": attn * 1e3,
        "largest_mib": largest.largest / 2**20,
        "full_mib": batch * heads * context * context * 4 / 2**20,
        "added_gflop": (flops["sampled"] - flops["step"]) / 1e9,
        "step_gflop": flops["step"] / 1e9,
        "attention_gflop": flops["attention"] / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=15, help="interleaved (plain, measured, attention) triples per case"
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; medians of {args.rounds} interleaved "
        f"rounds; chunk {LOGIT_CHUNK_ELEMENTS} logits ({LOGIT_CHUNK_ELEMENTS * 4 / 2**20:.0f} MiB float32)"
    )
    print(
        f"{'case':<34} {'step ms':>8} {'sampled ms':>10} {'added ms':>9} {'vs step':>8} {'attn fwd ms':>11} "
        f"{'vs attn':>8} "
        f"{'per step @100':>13} {'largest MiB':>11} {'BxHxTxT MiB':>11} {'added GFLOP':>11} {'vs step':>8} "
        f"{'vs attn':>8}"
    )
    for name, (context, batch) in CASES.items():
        r = run_case(context, batch, args.rounds)
        print(
            f"{name:<34} {r['step_ms']:>8.2f} {r['sampled_ms']:>10.2f} {r['added_ms']:>+9.2f} "
            f"{r['added_ms'] / r['step_ms']:>7.1%} "
            f"{r['attention_ms']:>11.2f} {r['added_ms'] / r['attention_ms']:>7.2f}x "
            f"{r['added_ms'] / DEFAULT_CADENCE / r['step_ms']:>12.2%} "
            f"{r['largest_mib']:>11.2f} {r['full_mib']:>11.2f} {r['added_gflop']:>11.3f} "
            f"{r['added_gflop'] / r['step_gflop']:>7.1%} "
            f"{r['added_gflop'] / r['attention_gflop']:>7.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
