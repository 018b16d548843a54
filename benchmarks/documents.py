"""Protocol documents as the hooks send them, for the collector benchmarks (``ingest.py``, ``load.py``).

Values are random but shaped like a real run: log-normal gradient norms, format counts
on every ``format_every``-th step, grad and weight histograms on every
``histogram_every``-th step (the hooks' cadences).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from numwatch import protocol


def _array(values: np.ndarray, dtype: str) -> str:
    return protocol.pack_bytes(np.ascontiguousarray(values, dtype=dtype).tobytes())


def run_document(run: str, n_tensors: int, rank: int = 0) -> dict[str, Any]:
    """A run of ``n_tensors`` fp16-trained tensors."""
    tensors = [
        {"name": f"layers.{i // 4}.w{i % 4}", "shape": [256, 256], "dtype": "float32", "group": 0}
        for i in range(n_tensors)
    ]
    return dict(
        protocol.run_document(run, rank=rank, format="fp16", tensors=tensors, project="bench", config={"bench": True})
    )


def step_document(step: int, n_tensors: int, rng: np.random.Generator, with_format_counts: bool) -> dict[str, Any]:
    """One step as the hooks send it: every-step stats, format counts on sampled steps."""
    norms = rng.lognormal(-3.0, 1.0, n_tensors).astype(np.float32)
    stats = {
        "grad_norm": norms,
        "grad_absmax": (norms / 10).astype(np.float32),
        "nan_count": np.zeros(n_tensors, np.int64),
        "inf_count": np.zeros(n_tensors, np.int64),
    }
    if with_format_counts:
        for name in protocol.FORMAT_COUNT_STATS:
            stats[name] = rng.integers(0, 1000, n_tensors, dtype=np.int64)
    return dict(
        protocol.step_document(
            step,
            time=time.time(),
            step_time=0.2,
            loss=float(2.0 + rng.random()),
            loss_scale=65536.0,
            new_loss_scale=65536.0,
            lr=[3e-4],
            global_grad_norm=float(np.sqrt((norms.astype(np.float64) ** 2).sum())),
            headroom_bits=4.0,
            tensors={name: _array(values, protocol.TENSOR_STATS[name]) for name, values in stats.items()},
        )
    )


def histogram_document(step: int, kind: str, n_tensors: int, rng: np.random.Generator) -> dict[str, Any]:
    """A sampled step's exponent and linear histogram of every tensor (``kind`` grad or weight)."""
    elements = 256 * 256
    exponent = np.zeros((n_tensors, protocol.EXPONENT_BINS), np.int64)
    # Each tensor's values spread over ~12 binades around 2**-10, as small gradients do.
    centre = -protocol.EXPONENT_MIN - 10
    exponent[:, centre - 6 : centre + 6] = rng.multinomial(elements, np.full(12, 1 / 12), size=n_tensors)
    linear = rng.multinomial(elements, np.full(protocol.LINEAR_BINS, 1 / protocol.LINEAR_BINS), size=n_tensors)
    low = -rng.random(n_tensors).astype(np.float32)
    return dict(
        protocol.histogram_document(
            step,
            kind,
            exponent=_array(exponent, "<i8"),
            linear_min=_array(low, "<f4"),
            linear_max=_array(-low, "<f4"),
            linear=_array(linear, "<i8"),
        )
    )


def sampled(step: int, every: int) -> bool:
    """Whether the hooks measure a stat of cadence ``every`` at ``step`` (steps count from 1; 0 = never)."""
    return every > 0 and (step - 1) % every == 0


def batch_document(
    run: str,
    first_step: int,
    steps: int,
    n_tensors: int,
    rng: np.random.Generator,
    format_every: int,
    histogram_every: int = 0,
    rank: int = 0,
) -> dict[str, Any]:
    """Steps ``first_step .. first_step + steps - 1`` of ``run``, with the hooks' sampling cadences
    (every ``format_every``-th and ``histogram_every``-th step from step 1; 0 turns one off)."""
    numbers = range(first_step, first_step + steps)
    return dict(
        protocol.batch_document(
            run,
            rank=rank,
            batch_id=f"{run}-{rank}-{first_step}",
            steps=[step_document(s, n_tensors, rng, sampled(s, format_every)) for s in numbers],
            histograms=[
                histogram_document(s, kind, n_tensors, rng)
                for s in numbers
                if sampled(s, histogram_every)
                for kind in protocol.HISTOGRAM_KINDS
            ],
        )
    )


def values_in(batch: dict[str, Any], n_tensors: int) -> int:
    """Per-tensor values a batch carries: one per tensor per stat array (histograms not counted)."""
    return n_tensors * sum(len(step["tensors"]) for step in batch["steps"])
