"""Every kind of watched training step, as small loops on any device, and their host syncs.

Each loop watches one kind of step (every-step norms, format counts, sampled statistics with
Adam health, quantization, the forward probe, clipping, GradScaler sites, non-finite
gradients, activation tracing). :func:`record` runs one unwatched or watched, the same loop
from the same seed, under a :class:`~tests.support.syncs.SyncRecorder` (and, on CUDA, torch's
own sync debug mode in "warn"); :func:`added` is what the watched run did beyond the
unwatched one. The first steps run before recording: they build cached tables and layouts
on the host once (host work, which the simulated accelerator cannot tell from device work),
so each loop's cadence comes round during them.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import numwatch
from tests.support.nanogpt import NanoGPT
from tests.support.syncs import SyncRecorder
from tests.support.watch_helpers import BackwardInjection, read_spool

WARMUP = 2  # steps run before recording (every cadence below is 1 or 2)
RECORDED = 3


@dataclass
class Loop:
    """One kind of training step: the model, its optimizer (and scaler) and one step of it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[int], None]
    scaler: torch.amp.GradScaler | None = None
    watch: dict[str, Any] = field(default_factory=dict)


Build = Callable[[torch.device], Loop]


def mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4)]
    return nn.Sequential(*layers).to(device)


def inputs(step: int, device: torch.device) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(step)).to(device)


def _sgd(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=1e-2, momentum=0.9)


def _adamw(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3)


def _plain(
    optimizer: Callable[[Any], torch.optim.Optimizer] = _sgd,
    clip: Callable[[nn.Module, int], None] | None = None,
    **watch: Any,
) -> Build:
    def build(device: torch.device) -> Loop:
        model = mlp(device)
        opt = optimizer(model.parameters())

        def step(number: int) -> None:
            model(inputs(number, device)).pow(2).mean().backward()
            if clip is not None:
                clip(model, number)
            opt.step()
            opt.zero_grad()

        return Loop(model, opt, step, watch=watch)

    return build


def _scaled(fused: bool) -> Build:
    def build(device: torch.device) -> Loop:
        model = mlp(device)
        opt = (
            torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            if fused
            else torch.optim.SGD(model.parameters(), lr=1e-2)
        )
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)

        def step(number: int) -> None:
            scaler.scale(model(inputs(number, device)).pow(2).mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # after unscale_: the usual AMP recipe
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()

        return Loop(model, opt, step, scaler=scaler, watch={"histogram_every": 2, "format_every": 1, "quant_every": 0})

    return build


def _forward_probe(device: torch.device) -> Loop:
    torch.manual_seed(0)
    model = NanoGPT(vocab=32, d=16, heads=2, layers=2, context=8).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(number: int) -> None:
        tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(number)).to(device)
        _, loss = model(tokens[:, :-1], tokens[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad()

    return Loop(model, opt, step, watch={"attention_every": 1, "histogram_every": 0, "quant_every": 0})


def _nonfinite(device: torch.device) -> Loop:
    loop = _plain(histogram_every=2, quant_every=0, on_nonfinite="ignore")(device)
    injection = BackwardInjection(loop.model[0].weight, (0, slice(0, 2)), [float("nan"), float("inf")], {3})
    inner = loop.step

    def step(number: int) -> None:
        injection.step = number
        inner(number)

    loop.step = step
    return loop


def _clip(model: nn.Module, number: int) -> None:
    if number % 2:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    else:
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)


LOOPS: dict[str, Build] = {
    "every step": _plain(histogram_every=0, format_every=0, quant_every=0),
    "format count": _plain(histogram_every=0, format_every=1, quant_every=0),
    "sampled, Adam health": _plain(_adamw, histogram_every=1, format_every=2, quant_every=0),
    "quantization": _plain(histogram_every=0, quant_every=1),
    "forward probe": _forward_probe,
    "clipping": _plain(clip=_clip, histogram_every=2, quant_every=0),
    "GradScaler": _scaled(fused=False),
    "GradScaler, fused optimizer": _scaled(fused=True),
    "non-finite gradients": _nonfinite,
    "activation tracing": _plain(histogram_every=0, quant_every=0, trace_activations=True),
}


@dataclass
class Recorded:
    kinds: collections.Counter[str]
    syncs: list[str]
    host_copies: int
    steps: list[dict[str, Any]]
    cuda_syncs: int = 0  # what torch.cuda's sync debug mode reported (CUDA only)


@contextmanager
def _cuda_sync_warnings(device: torch.device) -> Iterator[list[warnings.WarningMessage]]:
    """torch.cuda.set_sync_debug_mode("warn") while inside, its warnings collected (none off CUDA)."""
    if device.type != "cuda":
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def record(build: Build, device: torch.device, spool: Path | None) -> Recorded:
    """Run ``build``'s loop, watched when ``spool`` is given; the syncs of its recorded steps."""
    loop = build(device)
    watcher = (
        numwatch.watch(loop.model, loop.optimizer, scaler=loop.scaler, spool_dir=spool, run="syncs", **loop.watch)
        if spool is not None
        else None
    )
    for number in range(1, WARMUP + 1):
        loop.step(number)
    with _cuda_sync_warnings(device) as caught, SyncRecorder() as recorder:
        for number in range(WARMUP + 1, WARMUP + RECORDED + 1):
            loop.step(number)
        if watcher is not None:
            watcher.close()
    steps: list[dict[str, Any]] = []
    if watcher is not None:
        assert watcher.monitoring_errors == 0
        steps = read_spool(watcher.spool_dir).steps
    cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    return Recorded(recorder.kinds(), [str(sync) for sync in recorder.syncs], recorder.host_copies, steps, cuda_syncs)


def added(baseline: Recorded, watched: Recorded) -> list[str]:
    """The watched run's syncs of the kinds it has more of than the unwatched run (numwatch's
    own first, for the message), and those torch's sync debug mode counted beyond it."""
    extra = watched.kinds - baseline.kinds
    found = [sync for sync in watched.syncs if sync.split(" (")[0] in extra]
    found = [sync for sync in found if " at hooks/" in sync] or found
    if watched.cuda_syncs > baseline.cuda_syncs:
        found.append(
            f"{watched.cuda_syncs - baseline.cuda_syncs} more syncs reported by torch.cuda.set_sync_debug_mode"
        )
    return found
