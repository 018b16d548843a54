"""DeepSpeed on CPU in spawned gloo ranks: the setup every DeepSpeed test repeats.

``DS_ACCELERATOR=cpu`` makes DeepSpeed pick gloo and the CPU. At start-up DeepSpeed would
build (25–35 s cold) and load its shared-memory communication extension, which training on
gloo does not use: :func:`init_deepspeed` tells it that no compiled op is compatible, which
also skips probing the compilers. A torch optimizer is passed to ``deepspeed.initialize``,
so no C++ optimizer op is built either.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from numwatch.monitor.ops.stack import free_port
from tests.support.binaries import missing

WORLD_SIZE = 2
ROOT = str(Path(__file__).resolve().parents[2])


def init_deepspeed(rank: int, port: int) -> Any:
    """In a spawned rank: the environment DeepSpeed reads, the process group, no op builds; the module."""
    sys.path.insert(0, ROOT)
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}  # nothing to build or probe (see the module docstring)
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def zero_config(stage: int, dtype: str, *, micro_batch: int, accumulation: int = 1, **extra: Any) -> dict[str, Any]:
    """A ZeRO ``stage`` config for ``dtype`` ("fp32", "bf16", "fp16": dynamic loss scaling)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 12}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def spawn(target: Callable[..., None], *args: Any) -> None:
    """Run ``target(rank, port, *args)`` in WORLD_SIZE fresh processes (skips without DeepSpeed)."""
    if importlib.util.find_spec("deepspeed") is None:  # not imported here: only the ranks need it
        missing("deepspeed is not installed (requirements-dev.txt pins it; run make install)")
    if not torch.distributed.is_available():
        missing("torch.distributed is not available in this build")
    torch.multiprocessing.spawn(target, args=(free_port(), *args), nprocs=WORLD_SIZE, join=True)


def run_rank(body: Callable[[], None]) -> None:
    """Run a spawned rank's ``body``, then leave without the interpreter's exit (gloo may abort
    there): status 0 after flushing, 1 after printing the traceback of a failure."""
    status = 1
    try:
        body()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
