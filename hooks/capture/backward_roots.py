"""See the tensors every backward starts from (the loss), without user code.

``loss.backward()`` calls ``torch.autograd.backward``, looked up on the module at each call,
so one process-wide wrapper sees the roots of every backward. A listener only keeps the
roots; whether the backward belonged to a watched model is decided by that model's
end-of-backward trigger, which takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from numwatch.capture.guard import Guard
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
    """Keeps the scalar floating-point roots (the loss) of the latest ``torch.autograd.backward``
    until they are taken, until :meth:`remove`."""

    def __init__(self, guard: Guard) -> None:
        self._roots: tuple[torch.Tensor, ...] = ()
        self._listener = guard("backward root listener", self._saw)
        BACKWARD.add(self._listener)

    def _saw(self, roots: tuple[torch.Tensor, ...]) -> None:
        self._roots = tuple(
            root.detach() for root in roots if root.numel() == 1 and root.requires_grad and root.is_floating_point()
        )

    def take(self) -> tuple[torch.Tensor, ...]:
        """The roots of the backward under way (or just ended), forgotten here."""
        roots, self._roots = self._roots, ()
        return roots

    def remove(self) -> None:
        BACKWARD.remove(self._listener)
