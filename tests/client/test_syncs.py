"""On the accelerator path a watched step adds no host sync: nothing that makes the device
wait for the host, except the step's one documented host copy (tests/support/syncs.py).

Each kind of step runs twice on the accelerator path (the CPU's tensors sent down it): once
unwatched and once watched, the same loop from the same seed, under a :class:`SyncRecorder`.
Whatever the watched run records beyond the unwatched one is numwatch's. The first steps run
before recording: they build cached tables and layouts on the host once (host work, which the
simulation cannot tell from device work), so each loop watches one kind of step whose cadence
comes round during them.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import numwatch
from numwatch.kernels.device import simulate_accelerator
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


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(16, 12, generator=torch.Generator().manual_seed(step))


def _plain(
    optimizer: Callable[[Any], torch.optim.Optimizer] = lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    clip: Callable[[nn.Module, int], None] | None = None,
    **watch: Any,
) -> Callable[[], Loop]:
    def build() -> Loop:
        model = _mlp()
        opt = optimizer(model.parameters())

        def step(number: int) -> None:
            model(_inputs(number)).pow(2).mean().backward()
            if clip is not None:
                clip(model, number)
            opt.step()
            opt.zero_grad()

        return Loop(model, opt, step, watch=watch)

    return build


def _scaled(fused: bool) -> Callable[[], Loop]:
    def build() -> Loop:
        model = _mlp()
        opt = (
            torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            if fused
            else torch.optim.SGD(model.parameters(), lr=1e-2)
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

        def step(number: int) -> None:
            scaler.scale(model(_inputs(number)).pow(2).mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # after unscale_: the usual AMP recipe
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()

        return Loop(model, opt, step, scaler=scaler, watch={"histogram_every": 2, "format_every": 1, "quant_every": 0})

    return build


def _forward_probe() -> Loop:
    torch.manual_seed(0)
    model = NanoGPT(vocab=32, d=16, heads=2, layers=2, context=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(number: int) -> None:
        generator = torch.Generator().manual_seed(number)
        tokens = torch.randint(0, 32, (2, 9), generator=generator)
        _, loss = model(tokens[:, :-1], tokens[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad()

    return Loop(model, opt, step, watch={"attention_every": 1, "histogram_every": 0, "quant_every": 0})


def _nonfinite() -> Loop:
    loop = _plain(histogram_every=2, quant_every=0, on_nonfinite="ignore")()
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


def _adamw(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3)


LOOPS: dict[str, Callable[[], Loop]] = {
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


def _record(build: Callable[[], Loop], spool: Path | None) -> Recorded:
    loop = build()
    watcher = (
        numwatch.watch(loop.model, loop.optimizer, scaler=loop.scaler, spool_dir=spool, run="syncs", **loop.watch)
        if spool is not None
        else None
    )
    for number in range(1, WARMUP + 1):
        loop.step(number)
    with SyncRecorder() as recorder:
        for number in range(WARMUP + 1, WARMUP + RECORDED + 1):
            loop.step(number)
        if watcher is not None:
            watcher.close()
    steps: list[dict[str, Any]] = []
    if watcher is not None:
        assert watcher.monitoring_errors == 0
        steps = read_spool(watcher.spool_dir).steps
    return Recorded(recorder.kinds(), [str(sync) for sync in recorder.syncs], recorder.host_copies, steps)


def _added(baseline: Recorded, watched: Recorded) -> list[str]:
    """The watched run's syncs of the kinds it has more of than the unwatched run (all of them, for the message)."""
    extra = watched.kinds - baseline.kinds
    added = [sync for sync in watched.syncs if sync.split(" (")[0] in extra]
    return [sync for sync in added if " at hooks/" in sync] or added  # numwatch's own first


@pytest.mark.parametrize("kind", list(LOOPS))
def test_a_watched_step_adds_no_host_sync(kind: str, tmp_path: Path) -> None:
    with simulate_accelerator():
        baseline = _record(LOOPS[kind], None)
        watched = _record(LOOPS[kind], tmp_path)
    assert not _added(baseline, watched), "\n".join(_added(baseline, watched))
    # One copy per step; close() may add one for the final weights' statistics.
    assert RECORDED <= watched.host_copies <= RECORDED + 1
    assert len(watched.steps) == WARMUP + RECORDED


def test_the_recorder_sees_every_kind_of_sync() -> None:
    """The detector itself: each kind of host sync, on the simulated accelerator."""
    x = torch.randn(10)
    with simulate_accelerator(), SyncRecorder() as recorder:
        x.sum().item()
        bool(x[0] > 0)
        x.nonzero()
        x.masked_select(x > 0)
        _ = x[x > 0]
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.tolist()
        x.cpu()
        x.numpy()
        x.to("cpu")
        torch.tensor([1.0], device="cpu")
        torch.bincount(torch.tensor([1, 2]))
        torch.histc(x, bins=4)
        # None of these waits: fixed sizes, fixed ranges, non-blocking moves.
        torch.histc(x, bins=4, min=-1, max=1)
        x.to("cpu", non_blocking=True)
        torch.repeat_interleave(x, torch.full((10,), 2), output_size=20)
        x.index_select(0, torch.tensor([1, 2]))
    assert recorder.kinds() == {
        "item": 2,
        "nonzero": 1,
        "masked_select": 1,
        "boolean-mask index": 1,
        "unique": 1,
        "repeat_interleave": 1,
        "tolist": 1,
        "copy to host": 1,
        "numpy": 1,
        "transfer that may block": 1,
        "blocking copy to the device": 1,
        "bincount": 1,
        "histc of an unknown range": 1,
    }
    assert all("test_syncs.py" in sync.where for sync in recorder.syncs)


# --------------------------------------------------------------------------- DDP and FSDP2, two gloo ranks

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _distributed_loop(wrap: str) -> Loop:
    model = _mlp()
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rank = torch.distributed.get_rank()

    def step(number: int) -> None:
        model(_inputs(number * WORLD_SIZE + rank)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()

    return Loop(model, opt, step, watch={"histogram_every": 2, "format_every": 1, "quant_every": 2})


def _distributed(rank: int, wrap: str, port: int, spool_root: str, root: str) -> None:
    sys.path.insert(0, root)
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    with simulate_accelerator():
        baseline = _record(lambda: _distributed_loop(wrap), None)
        watched = _record(lambda: _distributed_loop(wrap), Path(spool_root, "spool"))
    result = {"added": _added(baseline, watched), "copies": watched.host_copies, "steps": len(watched.steps)}
    Path(spool_root, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)  # gloo aborts at interpreter exit otherwise


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_distributed_steps_add_no_host_sync(wrap: str, tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    mp.spawn(_distributed, args=(wrap, _free_port(), str(tmp_path), root), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not result["added"], "\n".join(result["added"])
        assert RECORDED <= result["copies"] <= RECORDED + 1
        assert result["steps"] == WARMUP + RECORDED
