"""A compiled model (inductor, CPU) stays as it compiles unwatched: no graph break, no
recompilation of regular steps, ``fullgraph=True`` works, and the numbers equal the eager run's.

Counted with dynamo's own counters: the frames a counting backend compiles and the graph
breaks dynamo records. A sampled step's forward runs with the attention capture (a
``TorchFunctionMode``) on the mode stack: dynamo guards on that stack, so sampled forwards
take one extra compiled variant, compiled at the first sampled step and reused at every
later one (docs/gpu.md). Regular steps run the variant an unwatched run compiles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import numwatch
from tests.support.nanogpt import NanoGPT
from tests.support.watch_helpers import read_spool

pytestmark = pytest.mark.slow

STEPS = 5  # sampled: 1 and 4 (histogram_every=3); format counts at 1, 3, 5
WATCH = {"histogram_every": 3, "format_every": 2, "quant_every": 0}
RTOL = 1e-5


def _model() -> NanoGPT:
    torch.manual_seed(0)
    model = NanoGPT(vocab=32, d=16, heads=2, layers=2, context=8)
    return model.train(False)  # no dropout: eager and compiled draw no random numbers


def _run(how: str, spool: Path | None) -> dict[str, Any]:
    """Train STEPS steps: ``how`` is "eager", or "before"/"after" (watch before or after
    torch.compile), or "unwatched" (compiled). Frames compiled after each step, graph breaks,
    and what the watcher spooled."""
    torch._dynamo.reset()
    counters.clear()
    model = _model()
    # SGD: a compiled and an eager run drift apart by rounding only (Adam would magnify it near zero gradients).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    counter = CompileCounterWithBackend("inductor")
    watcher = numwatch.watch(model, optimizer, spool_dir=spool, **WATCH) if how in ("eager", "before") else None
    compiled = model if how == "eager" else torch.compile(model, backend=counter, fullgraph=True)
    if how == "after":
        watcher = numwatch.watch(compiled, optimizer, spool_dir=spool, **WATCH)
    frames = []
    for step in range(1, STEPS + 1):
        tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(step))
        _, loss = compiled(tokens[:, :-1], tokens[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        frames.append(counter.frame_count)
    result: dict[str, Any] = {"frames": frames, "breaks": sum(counters["graph_break"].values())}
    if watcher is not None:
        watcher.close()
        assert watcher.monitoring_errors == 0
        result["steps"] = read_spool(watcher.spool_dir).steps
    return result


def _numbers(step: dict[str, Any]) -> dict[str, float]:
    numbers = {"global_grad_norm": float(step["global_grad_norm"])}
    for field in ("attention_logit_max", "output_logits"):
        numbers.update({f"{field}.{name}": float(value) for name, value in (step.get(field) or {}).items()})
    return numbers


@pytest.fixture(scope="module")
def eager(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run("eager", tmp_path_factory.mktemp("eager"))


@pytest.fixture(scope="module")
def unwatched() -> dict[str, Any]:
    return _run("unwatched", None)


@pytest.mark.parametrize("how", ["before", "after"])
def test_a_watched_compiled_model_compiles_as_unwatched(how: str, eager, unwatched, tmp_path: Path) -> None:
    watched = _run(how, tmp_path)
    assert unwatched["frames"] == [1] * STEPS and unwatched["breaks"] == 0
    assert watched["breaks"] == 0
    # Step 1 (sampled) compiles the forward with the attention capture, step 2 the regular
    # forward; nothing after: neither regular steps nor the sampled step 4 recompile.
    assert watched["frames"] == [1] + [2] * (STEPS - 1)
    assert [s["step"] for s in watched["steps"]] == list(range(1, STEPS + 1))
    for compiled_step, eager_step in zip(watched["steps"], eager["steps"], strict=True):
        compiled_numbers, eager_numbers = _numbers(compiled_step), _numbers(eager_step)
        assert compiled_numbers.keys() == eager_numbers.keys()
        for name, value in eager_numbers.items():
            np.testing.assert_allclose(compiled_numbers[name], value, rtol=RTOL, err_msg=name)
    assert _numbers(watched["steps"][3]).keys() > {"global_grad_norm"}  # step 4 measured its forward
