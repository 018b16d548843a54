"""Everything numwatch reads from a ``torch.amp.GradScaler`` beyond its public API, in one place.

``torch/amp/grad_scaler.py`` keeps, per optimizer, a stage: READY (the gradients in ``.grad``
are still scaled by S), UNSCALED (``unscale_`` ran: they are unscaled, and
``found_inf_per_device`` holds the Inf/NaN flags) and STEPPED (``step`` ran); ``update``
resets it. The scale S lives in a device tensor. Reading those without a host-device sync
needs private names; if torch renames them, only this module changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.amp.grad_scaler import OptState


class ScalerAdapter:
    """Read-only views of one GradScaler's per-step state, and the patches numwatch puts on it."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        if {"update", "scale"} & set(vars(scaler)):
            raise RuntimeError("this GradScaler's update/scale are already patched (watched by another watcher?)")
        self.scaler = scaler
        self._patched: list[str] = []

    def scale(self) -> torch.Tensor | None:
        """The current scale S as a device tensor (no sync); None before the first ``scale()``."""
        return self.scaler._get_scale_async()

    def _state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        # .get: the states dict is a defaultdict, and reading must not create an entry.
        return self.scaler._per_optimizer_states.get(id(optimizer)) if optimizer is not None else None

    def unscaled(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """Whether ``.grad`` of ``optimizer``'s parameters holds unscaled values this step."""
        state = self._state(optimizer)
        return state is not None and state["stage"] is not OptState.READY

    def found_inf(self, optimizer: torch.optim.Optimizer | None, device: torch.device) -> torch.Tensor | None:
        """Sum of the per-device Inf/NaN flags ``unscale_`` (or a fused step) left, on ``device``; None if none yet."""
        state = self._state(optimizer)
        if state is None or not state["found_inf_per_device"]:
            return None
        return torch.stack(
            [flag.to(device, non_blocking=True) for flag in state["found_inf_per_device"].values()]
        ).sum()

    def scaling(self, optimizer: torch.optim.Optimizer | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(gradient multiplier, format multiplier) for gradients read now: 1/S while they are
        still scaled (so the statistics are of the unscaled gradients), else S for the format
        counts (which are about g*S)."""
        scale = self.scale()
        if scale is None:
            return None, None
        if self.unscaled(optimizer):
            return None, scale
        return scale.double().reciprocal().float(), None

    def patch(self, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace the instance's method ``name`` by ``wrapper(original)`` until :meth:`restore`."""
        setattr(self.scaler, name, wrapper(getattr(self.scaler, name)))
        self._patched.append(name)

    def restore(self) -> None:
        """Remove every patch (the class's methods show through again)."""
        for name in self._patched:
            delattr(self.scaler, name)
        self._patched.clear()
