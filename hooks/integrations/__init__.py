"""Framework adapters over :func:`numwatch.watch`, each imported only when used.

``from numwatch.integrations import HuggingFaceCallback`` (``transformers.TrainerCallback``) or
``LightningCallback`` (``lightning.pytorch.Callback``); importing ``numwatch`` or this package imports no
framework. Accelerate needs no adapter: ``numwatch.watch(model, optimizer)`` on the objects
``accelerator.prepare`` returned.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "HuggingFaceCallback": ("numwatch.integrations.huggingface", "NumwatchCallback"),
    "LightningCallback": ("numwatch.integrations.lightning", "NumwatchCallback"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'numwatch.integrations' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
