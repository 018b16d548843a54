"""numwatch's training-side hooks: ``watcher = hooks.watch(model, optimizer, scaler=scaler)``.

The public names are imported lazily, so the collector can import ``hooks.protocol``
without pulling in torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "watch": "hooks.watcher",
    "Watcher": "hooks.watcher",
    "NonFiniteError": "hooks.watcher",
    "UnsupportedConfiguration": "hooks.sharded",
    "iter_spool": "hooks.spool",
    "spool_directories": "hooks.spool",
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
