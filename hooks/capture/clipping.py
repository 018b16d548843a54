"""What clipping did to a step: torch's clip functions, wrapped while any watcher listens.

The gradients are measured before clipping (at the end of the backward); these wrappers add
what the clip changed. ``clip_grad_norm_`` and ``clip_grads_with_norm_`` both scale by
``min(1, max_norm / (total_norm + 1e-6))`` in ``torch.nn.utils.clip_grad._clip_grads_with_norm_``,
which ``clip_grad_norm_`` looks up as a module global: wrapping it there sees every norm
clip, even through a ``clip_grad_norm_`` imported by name before watching. ``clip_grad_value_``
is wrapped where it is looked up (``torch.nn.utils`` and its module); one imported by name
before watching, and clipping by hand, go unseen: the step's clip fields stay empty (its
pre-clip numbers are right regardless).

Per step (:class:`ClipEffect`): the post-clip norm of each watched tensor (its pre-clip norm
times the coefficient for norm clipping, measured after the clamp for value clipping). The
observer reports to the step under way through :class:`ClipTarget` (the step ledger).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.utils.clip_grad as clip_grad

from numwatch.capture.guard import Guard
from numwatch.capture.patches import SharedPatch
from numwatch.kernels.device import to_device
from numwatch.kernels.sharded import is_dtensor

if TYPE_CHECKING:
    pass

NORM_EPSILON = 1e-6  # torch's, in the clip coefficient


def _as_list(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _wrap_norm_clip(original: Callable[..., Any], patch: SharedPatch) -> Callable[..., Any]:
    def clip_grads_with_norm_(
        parameters: Any, max_norm: float, total_norm: torch.Tensor, foreach: bool | None = None
    ) -> None:
        parameters = _as_list(parameters)
        for listener in patch.listeners:
            listener.before_clip(parameters)
        original(parameters, max_norm, total_norm, foreach)
        for listener in patch.listeners:
            listener.after_norm_clip(parameters, max_norm, total_norm)

    return clip_grads_with_norm_


def _wrap_value_clip(original: Callable[..., Any], patch: SharedPatch) -> Callable[..., Any]:
    def clip_grad_value_(parameters: Any, clip_value: float, foreach: bool | None = None) -> None:
        parameters = _as_list(parameters)
        for listener in patch.listeners:
            listener.before_clip(parameters)
        original(parameters, clip_value, foreach)
        for listener in patch.listeners:
            listener.after_value_clip(parameters)

    return clip_grad_value_


NORM_CLIP = SharedPatch(
    [(clip_grad, "_clip_grads_with_norm_"), (torch.nn.utils, "clip_grads_with_norm_")], _wrap_norm_clip
)
VALUE_CLIP = SharedPatch([(clip_grad, "clip_grad_value_"), (torch.nn.utils, "clip_grad_value_")], _wrap_value_clip)


class ClipEffect:
    """The post-clip norms of one step's reading, as device tensors (columns of the reading)."""

    def __init__(self, pre_clip: torch.Tensor) -> None:
        self.norms = pre_clip.clone()


class ClipTarget(Protocol):
    """The step under way, as the clip observer reports to it."""

    def gradient_columns(self) -> list[int] | None:
        """Schema indices of the gradients read for the step, in column order (None: all of them);
        [] when its gradients were not read."""
        ...

    def before_clip(self) -> None:
        """The read gradients are about to be rewritten."""
        ...

    def clip_effect(self) -> ClipEffect:
        """The step's ClipEffect (made from the pre-clip norms at the first clip)."""
        ...

    def norms_now(self) -> torch.Tensor:
        """The per-tensor L2 norms of the read gradients as they are now."""
        ...


class ClipObserver:
    """One watcher's view of the clip calls: those touching its gradients (``parameters``, in
    schema order) change the ClipEffect of ``target``'s step."""

    def __init__(self, parameters: Sequence[torch.Tensor], target: ClipTarget, guard: Guard) -> None:
        self._target = target
        self._index = {id(p): i for i, p in enumerate(parameters)}
        # Made once: a host-to-device copy per step could synchronise.
        self._device_columns: dict[tuple[int, ...], torch.Tensor] = {}
        self.before_clip = guard("clip wrapper", self._before_clip)
        self.after_norm_clip = guard("clip wrapper", self._after_norm_clip)
        self.after_value_clip = guard("clip wrapper", self._after_value_clip)
        NORM_CLIP.add(self)
        VALUE_CLIP.add(self)

    def remove(self) -> None:
        NORM_CLIP.remove(self)
        VALUE_CLIP.remove(self)

    def _columns(self, parameters: list[torch.Tensor]) -> list[int]:
        """Columns of the step's reading that these parameters' gradients fill."""
        present = self._target.gradient_columns()
        if present == []:
            return []
        schema = [self._index[id(p)] for p in parameters if id(p) in self._index and p.grad is not None]
        if present is None:
            return schema
        column = {index: c for c, index in enumerate(present)}
        return [column[i] for i in schema if i in column]

    def _before_clip(self, parameters: list[torch.Tensor]) -> None:
        if self._columns(parameters):
            self._target.before_clip()

    def _after_norm_clip(self, parameters: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
        columns = self._columns(parameters)
        if not columns:
            return
        total = total_norm.full_tensor() if is_dtensor(total_norm) else total_norm
        effect = self._target.clip_effect()
        # The coefficient exactly as torch computes it.
        coefficient = torch.clamp(
            float(max_norm) / (total.to(effect.norms.device, non_blocking=True) + NORM_EPSILON), max=1.0
        )
        index = self._on_device(columns, effect.norms.device)
        effect.norms[index] = effect.norms[index] * coefficient.to(effect.norms.dtype)

    def _after_value_clip(self, parameters: list[torch.Tensor]) -> None:
        columns = self._columns(parameters)
        if not columns:
            return
        effect = self._target.clip_effect()
        after = self._target.norms_now()
        index = self._on_device(columns, effect.norms.device)
        effect.norms[index] = after[index].to(effect.norms.dtype)

    def _on_device(self, columns: list[int], device: torch.device) -> torch.Tensor:
        key = tuple(columns)
        if key not in self._device_columns:
            self._device_columns[key] = to_device(torch.tensor(columns), device)
        return self._device_columns[key]
