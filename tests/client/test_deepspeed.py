"""DeepSpeed ZeRO on CPU with gloo, two spawned ranks, all scenarios in one process group.

Starting DeepSpeed costs seconds per process, so one spawned group runs every scenario of
this module and saves what each rank saw; the tests below read those results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.deepspeed_ranks import init_deepspeed, run_rank, spawn, zero_config

BATCH = 8  # the combined batch of both ranks


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Odd sizes: ZeRO's partitions cut tensors at uneven places.
    return torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))


def _engine(deepspeed: Any, stage: int, dtype: str, **extra: Any) -> Any:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = zero_config(stage, dtype, micro_batch=BATCH // 2, **extra)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _refusals(deepspeed: Any, spool: str) -> dict[str, str]:
    """What watch() said to each setup it must refuse: the refusal's message, or what it did instead."""
    import numwatch

    said = {}
    for stage in (1, 2):
        engine = _engine(deepspeed, stage, "fp32")
        try:
            numwatch.watch(engine.module, engine.optimizer, run=f"refused-{stage}", spool_dir=spool).close()
            said[f"zero{stage}-unwrapped"] = "accepted"
        except numwatch.UnsupportedConfiguration as refusal:
            said[f"zero{stage}-unwrapped"] = str(refusal)
    return said


def _ranks(rank: int, port: int, out: str) -> None:
    def body() -> None:
        deepspeed = init_deepspeed(rank, port)
        results = {"refusals": _refusals(deepspeed, out)}
        torch.save(results, Path(out) / f"rank{rank}.pt")

    run_rank(body)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("deepspeed")
    spawn(_ranks, str(out))
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def test_a_zero_optimizer_given_unwrapped_is_never_accepted_and_misreported(ranks: list[dict[str, Any]]) -> None:
    # watch(engine.module, engine.optimizer) under ZeRO-1/2 was accepted (the inner torch
    # optimizer was unwrapped before the refusal looked) and recorded each rank's local norm.
    for results in ranks:
        for stage in (1, 2):
            assert "DeepSpeed" in results["refusals"][f"zero{stage}-unwrapped"]
