"""Spawning a small gloo job on CPU: each rank runs a function in a fresh interpreter."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from numwatch.monitor.ops.stack import free_port

ROOT = str(Path(__file__).resolve().parents[2])


def _rank_main(rank: int, world_size: int, port: int, function: Callable[..., None], args: tuple[Any, ...]) -> None:
    sys.path.insert(0, ROOT)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    code = 0
    try:
        function(rank, world_size, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        code = 1  # spawn then stops the other ranks and raises
    finally:
        # gloo aborts at interpreter exit with a live group: leave at once (everything is flushed by now).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn(function: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``function(rank, world_size, *args)`` on ``world_size`` gloo ranks (a module-level function)."""
    mp.spawn(_rank_main, args=(world_size, free_port(), function, args), nprocs=world_size, join=True)
