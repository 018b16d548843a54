"""numwatch: numeric-health monitoring for PyTorch training.

``watcher = numwatch.watch(model, optimizer, scaler=scaler)`` is the training side's one line;
the collector is :mod:`numwatch.monitor`. The public names are imported lazily, so the
collector can import ``numwatch.protocol`` without torch, and a missing torch is one clear
error where the client is first used rather than at ``import numwatch``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "watch": "numwatch.watcher",
    "Watcher": "numwatch.watcher",
    "NonFiniteError": "numwatch.watcher",
    "observe_attention": "numwatch.capture.attention",
    "UnsupportedConfiguration": "numwatch.kernels.sharded",
    "iter_spool": "numwatch.delivery.spool",
    "spool_directories": "numwatch.delivery.spool",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'numwatch' has no attribute {name!r}")
    try:
        module = import_module(_EXPORTS[name])
    except ModuleNotFoundError as missing:
        if missing.name != "torch":
            raise
        # numwatch does not declare torch (pip could replace the user's own build), so say what to do.
        raise ImportError(
            f"numwatch.{name} needs PyTorch, which is not installed in this Python environment: "
            "install the torch build for your machine first (see pytorch.org), then import numwatch again"
        ) from None
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
