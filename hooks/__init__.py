"""numwatch's training-side hooks: ``watcher = numwatch.watch(model, optimizer, scaler=scaler)``.

The public names are imported lazily, so the collector can import ``numwatch.protocol``
without pulling in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "watch": "numwatch.watcher",
    "Watcher": "numwatch.watcher",
    "NonFiniteError": "numwatch.watcher",
    "UnsupportedConfiguration": "numwatch.sharded",
    "iter_spool": "numwatch.spool",
    "spool_directories": "numwatch.spool",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hooks' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
