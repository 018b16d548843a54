"""See the tensors every backward starts from (the loss), without user code.

``loss.backward()`` calls ``torch.autograd.backward``, looked up on the module at each call,
so one process-wide wrapper sees the roots of every backward. A listener only learns the
roots; whether the backward belonged to a watched model is decided by that model's
end-of-backward trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from numwatch.capture.patches import SharedPatch


def _wrap(original: Callable[..., Any], patch: SharedPatch) -> Callable[..., Any]:
    def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        roots = (
            (tensors,)
            if isinstance(tensors, torch.Tensor)
            else tuple(t for t in tensors if isinstance(t, torch.Tensor))
        )
        for listener in patch.listeners:
            listener(roots)
        return original(tensors, *args, **kwargs)

    return backward


BACKWARD = SharedPatch([(torch.autograd, "backward")], _wrap)


class RootListener:
    """Calls ``listener(roots)`` before every ``torch.autograd.backward`` until :meth:`remove`."""

    def __init__(self, listener: Callable[[tuple[torch.Tensor, ...]], None]) -> None:
        self._listener = listener
        BACKWARD.add(listener)

    def remove(self) -> None:
        BACKWARD.remove(self._listener)
