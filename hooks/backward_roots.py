"""See the tensors every backward starts from (the loss), without user code.

``loss.backward()`` calls ``torch.autograd.backward``, looked up on the module at each call,
so one process-wide wrapper, installed while any listener exists, sees the roots of every
backward. A listener only learns the roots; whether the backward belonged to a watched
model is decided by that model's end-of-backward trigger.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

Listener = Callable[[tuple[torch.Tensor, ...]], None]

_lock = threading.Lock()
_listeners: dict[int, Listener] = {}
_original: Callable[..., Any] | None = None


def _backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
    roots = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(t for t in tensors if isinstance(t, torch.Tensor))
    for listener in tuple(_listeners.values()):
        listener(roots)
    assert _original is not None
    return _original(tensors, *args, **kwargs)


class RootListener:
    """Calls ``listener(roots)`` before every ``torch.autograd.backward`` until :meth:`remove`."""

    def __init__(self, listener: Listener) -> None:
        global _original
        with _lock:
            if not _listeners:
                _original = torch.autograd.backward
                torch.autograd.backward = _backward
            _listeners[id(self)] = listener

    def remove(self) -> None:
        """Stop listening; the last listener puts torch's own function back."""
        global _original
        with _lock:
            if _listeners.pop(id(self), None) is not None and not _listeners:
                torch.autograd.backward = _original
                _original = None
