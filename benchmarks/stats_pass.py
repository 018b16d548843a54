"""Cost of the per-step statistics pass against the floor of one read of the gradients.

Run: ``python benchmarks/stats_pass.py [--repeats N]``. Builds a small GPT-style transformer
(4 layers, d_model 256, vocab 8192), runs a real backward pass to get its gradients (fp32,
then bf16), and times with ``time.perf_counter`` (warm-up first, median of the repeats):

- floor: ``torch._foreach_norm(grads, 2)`` (one read of every gradient);
- ``grad_norms`` (the pass the watcher runs at every step) and the abs-max variants it could use;
- ``format_counts`` against fp16 with loss scale 2**16, and ``exponent_histogram``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from numwatch import stats  # noqa: E402
from numwatch.formats import format_spec  # noqa: E402

VOCAB = 8192
D_MODEL = 256
LAYERS = 4
HEADS = 4
SEQUENCE = 128
BATCH = 8


class TinyGPT(nn.Module):
    """Token + position embeddings, causal pre-norm transformer blocks, untied LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, D_MODEL)
        self.positions = nn.Embedding(SEQUENCE, D_MODEL)
        block = nn.TransformerEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        hidden = self.blocks(self.tokens(ids) + self.positions(positions), mask=causal, is_causal=True)
        return self.head(self.norm(hidden))


def real_gradients(dtype: torch.dtype) -> list[torch.Tensor]:
    """Gradients of one next-token loss of a freshly initialised TinyGPT in ``dtype``."""
    torch.manual_seed(0)
    model = TinyGPT().to(dtype)
    ids = torch.randint(0, VOCAB, (BATCH, SEQUENCE + 1))
    logits = model(ids[:, :-1])
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    return [p.grad for p in model.parameters() if p.grad is not None]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 5) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def absmax_variants(grads: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """Ways to get per-tensor abs-max, to show why grad_norms uses _foreach_max(_foreach_abs) on the CPU."""
    return {
        "absmax: _foreach_norm(inf)": lambda: torch._foreach_norm(grads, float("inf")),
        "absmax: per-tensor aminmax": lambda: [torch.aminmax(g) for g in grads],
        "absmax: _foreach_max(_foreach_abs) (used)": lambda: torch._foreach_max(torch._foreach_abs(grads)),
    }


def report(dtype: torch.dtype, repeats: int) -> None:
    grads = real_gradients(dtype)
    elements = sum(g.numel() for g in grads)
    print(f"\n{dtype}: {len(grads)} gradient tensors, {elements / 1e6:.2f} M elements")
    floor = median_seconds(lambda: torch._foreach_norm(grads, 2), repeats)
    fp16 = format_spec("fp16")
    cases: dict[str, Callable[[], object]] = {
        "grad_norms": lambda: stats.grad_norms(grads, 2.0**-16),
        **absmax_variants(grads),
        "format_counts (fp16, S=2**16)": lambda: stats.format_counts(grads, fp16, 2.0**16),
        "exponent_histogram": lambda: stats.exponent_histogram(grads),
        "nonfinite_counts": lambda: stats.nonfinite_counts(grads),
    }
    print(f"  {'floor: _foreach_norm(grads, 2)':40s} {floor * 1e3:8.3f} ms   1.00x")
    for label, fn in cases.items():
        seconds = median_seconds(fn, repeats)
        print(f"  {label:40s} {seconds * 1e3:8.3f} ms  {seconds / floor:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for dtype in (torch.float32, torch.bfloat16):
        report(dtype, args.repeats)


if __name__ == "__main__":
    main()
