"""A process-wide wrapper around a torch function, shared by every watcher that listens.

Installed when the first listener arrives and removed with the last, so an unwatched
process runs torch's own functions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

Wrap = Callable[[Callable[..., Any], "SharedPatch"], Callable[..., Any]]


class SharedPatch:
    """``wrap(original, patch)`` replaces the attribute at each of ``places`` (all holding the
    same function) while :attr:`listeners` is not empty."""

    def __init__(self, places: Sequence[tuple[Any, str]], wrap: Wrap) -> None:
        self._places = places
        self._wrap = wrap
        self._originals: list[Any] = []
        self._listeners: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def listeners(self) -> tuple[Any, ...]:
        return tuple(self._listeners.values())

    def add(self, listener: Any) -> None:
        with self._lock:
            if not self._listeners:
                self._originals = [getattr(owner, name) for owner, name in self._places]
                for (owner, name), original in zip(self._places, self._originals, strict=True):
                    setattr(owner, name, self._wrap(original, self))
            self._listeners[id(listener)] = listener

    def remove(self, listener: Any) -> None:
        with self._lock:
            if self._listeners.pop(id(listener), None) is not None and not self._listeners:
                for (owner, name), original in zip(self._places, self._originals, strict=True):
                    setattr(owner, name, original)
                self._originals = []
