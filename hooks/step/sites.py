"""Where a step is counted and ended: one small class per place a training loop marks its steps.

Each site counts a step in exactly one place and ends it, both in the
:class:`~numwatch.step.ledger.StepLedger` (``count_step``, ``end_step``). The gradients
themselves are read at the end of the step's backward (see :mod:`numwatch.watcher`); a site
reads them only when no backward through the watched model was seen (a model called other
than through ``model(...)``), as a fallback. Every hook a site installs runs through the
watcher's :class:`~numwatch.capture.guard.Guard`.

* :class:`OptimizerHookSite` — no GradScaler: the optimizer's step pre-hook counts the step;
  it ends there, or after the update on sampled and quantization steps (weight statistics) and for
  closure-based optimizers (the backward runs inside ``step``).
* :class:`ScalerSite` — an enabled GradScaler: ``scaler.update()`` counts and ends the step,
  skipped or not; the optimizer's step pre-hook runs only when the scaler did not skip.
* :class:`FusedScalerSite` — the same for fused optimizers, whose step runs even when the
  scaler skips: only the device knows, so the skip is read from the scaler's Inf flags.
* :class:`FrameworkSite` — ``measure="manual"``: a framework adapter calls
  ``gradients_ready()`` and ``finish_step()``, which counts.
* :class:`StepCallSite` — loops without an optimizer object: ``watcher.step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from numwatch.capture.guard import Guard
from numwatch.capture.scaler import ScalerAdapter
from numwatch.step import records
from numwatch.step.ledger import StepLedger
from numwatch.step.measurement import StepMeasurement
from numwatch.step.reading import learning_rates


def _has_closure(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # The step hooks get (optimizer, *step_args): step(closure) runs the backward inside.
    return len(args) > 1 and args[1] is not None or kwargs.get("closure") is not None


class StepSite:
    """Base: reports to the ledger; the hooks it installed are removed by :meth:`remove`."""

    def __init__(self, ledger: StepLedger, guard: Guard, optimizer: torch.optim.Optimizer | None) -> None:
        self.ledger = ledger
        self.guard = guard
        self.optimizer = optimizer
        self._handles: list[Any] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _ensure_read(self, measurement: StepMeasurement) -> None:
        if measurement.reading is None:
            self.ledger.reader.read(measurement)
        measurement.lr = learning_rates(self.optimizer)

    def _end_counted(self, prepare: Callable[[], None], skip_known: bool | None) -> None:
        """Complete the counted step under way with ``prepare`` (reads, weight statistics) and end
        it. When ``prepare`` fails the step ends discarded, so that one failure costs one step
        (the guard around the hook logs and counts it)."""
        try:
            prepare()
        except Exception:
            self.ledger.fail()
            self.ledger.end_step(skip_known=None)
            raise
        self.ledger.end_step(skip_known=skip_known)

    def _add_weight_parts(self, measurement: StepMeasurement) -> None:
        watched = self.ledger.watched
        if measurement.reading is None:
            return
        if watched.cadence.sampled(measurement.number):
            measurement.parts.update(watched.weight_parts(measurement.reading, measurement.snapshot, self.optimizer))
        if watched.cadence.quant_due(measurement.number):
            measurement.parts.update(watched.quant_parts())


class OptimizerHookSite(StepSite):
    """No GradScaler: counted in the optimizer's step pre-hook."""

    def __init__(self, ledger: StepLedger, guard: Guard, optimizer: torch.optim.Optimizer | None) -> None:
        super().__init__(ledger, guard, optimizer)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(guard("optimizer step pre-hook", self.before_step)))
            self._handles.append(optimizer.register_step_post_hook(guard("optimizer step post-hook", self._after_step)))

    def before_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        counted = self.ledger.counted()
        if counted is not None and not counted.failed:
            return  # this step was counted already (the hook ran twice while attaching)
        measurement = self.ledger.count_step()
        if self.ledger.watched.cadence.after_update(measurement.number) or _has_closure(args, kwargs):
            # It stays COUNTED and ends in the post-hook, after the update; a failed read leaves it
            # failed until then, so a closure's backward inside the step cannot reach the next one.
            self._ensure_read(measurement)
        else:
            self._end_counted(lambda: self._ensure_read(measurement), skip_known=None)

    def _after_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        measurement = self.ledger.counted()
        if measurement is not None:
            self._end_counted(lambda: self._add_weight_parts(measurement), skip_known=None)


class ScalerSite(StepSite):
    """An enabled GradScaler: counted and ended in ``scaler.update()``.

    With ``ends_steps=False`` (framework adapters) it only adds the scale and the skip
    verdict to the step that ``finish_step()`` ends.
    """

    def __init__(
        self,
        ledger: StepLedger,
        guard: Guard,
        optimizer: torch.optim.Optimizer | None,
        adapter: ScalerAdapter,
        ends_steps: bool = True,
    ) -> None:
        super().__init__(ledger, guard, optimizer)
        self.adapter = adapter
        self.ends_steps = ends_steps
        adapter.patch("scale", self._wrap_scale)
        adapter.patch("update", self._wrap_update)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(guard("optimizer step pre-hook", self.before_step)))

    def remove(self) -> None:
        super().remove()
        self.adapter.restore()

    def _wrap_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        capture = self.guard("scaler.scale wrapper", self._add_loss)

        def scale(outputs: Any) -> Any:
            if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
                capture(outputs)
            return original(outputs)

        return scale

    def _add_loss(self, loss: torch.Tensor) -> None:
        self.ledger.current().add_losses([loss])

    def before_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        measurement = self.ledger.current()
        measurement.optimizer_stepped = True
        self._ensure_read(measurement)

    def _wrap_update(self, original: Callable[..., Any]) -> Callable[..., Any]:
        before = self.guard("scaler.update wrapper", self._scale_before)
        after = self.guard("scaler.update wrapper", self._after_update)

        def update(*args: Any, **kwargs: Any) -> Any:
            measurement = self.ledger.current()
            scale = before()
            result = original(*args, **kwargs)
            if self.ends_steps:
                self.ledger.count_step()  # an attempt counts even when measuring it fails
            try:
                after(measurement, scale)
            finally:
                measurement.optimizer_stepped = False
            return result

        return update

    def _scale_before(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scale and the Inf flags before update() resets them (None: update() before any scale())."""
        scale = self.adapter.scale()
        found_inf = self.adapter.found_inf(self.optimizer, self.ledger.watched.device)
        return (scale.clone() if scale is not None else None), found_inf

    def skip_known(self, measurement: StepMeasurement) -> bool | None:
        """Whether the scaler skipped this step, when the host knows it without a sync."""
        return not measurement.optimizer_stepped if self.optimizer is not None else None

    def _after_update(
        self, measurement: StepMeasurement, before: tuple[torch.Tensor | None, torch.Tensor | None] | None
    ) -> None:
        if not self.ends_steps:
            self._add_update_parts(measurement, before)
            measurement.skip_known = self.skip_known(measurement)
            return

        def prepare() -> None:
            self._add_update_parts(measurement, before)
            self._add_weight_parts(measurement)

        self._end_counted(prepare, skip_known=self.skip_known(measurement))

    def _add_update_parts(
        self, measurement: StepMeasurement, before: tuple[torch.Tensor | None, torch.Tensor | None] | None
    ) -> None:
        """The gradients (if no backward read them), the scale before and after update() and the Inf flags."""
        self._ensure_read(measurement)
        scale_before, found_inf = before if before is not None else (None, None)
        scale_after = self.adapter.scale()
        if scale_before is not None and scale_after is not None:
            measurement.parts[records.LOSS_SCALE] = scale_before
            measurement.parts[records.NEW_LOSS_SCALE] = scale_after
        if found_inf is not None:
            measurement.parts[records.FOUND_INF] = found_inf


class FusedScalerSite(ScalerSite):
    """A fused optimizer (``_step_supports_amp_scaling``) with an enabled GradScaler: its step
    runs even when the scaler skips, so the skip is only on the device (``found_inf``)."""

    def skip_known(self, measurement: StepMeasurement) -> bool | None:
        return None


class FrameworkSite(StepSite):
    """``measure="manual"``: the adapter reads the gradients (``gradients_ready()``) and ends the step here."""

    def finish_step(self) -> None:
        measurement = self.ledger.under_way
        if measurement is None or not measurement.started:
            return
        self.ledger.count_step()
        self._end_counted(lambda: self._add_weight_parts(measurement), skip_known=measurement.skip_known)


class StepCallSite(StepSite):
    """No optimizer object: ``watcher.step()`` counts and ends the step."""

    def step(self) -> None:
        measurement = self.ledger.count_step()

        def prepare() -> None:
            self._ensure_read(measurement)
            self._add_weight_parts(measurement)

        self._end_counted(prepare, skip_known=None)
