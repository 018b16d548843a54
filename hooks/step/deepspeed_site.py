"""Where a DeepSpeed step is read, counted and ended: the ZeRO optimizer's ``step()``.

The engine calls its optimizer's ``step()`` once per optimizer step, at the gradient
accumulation boundary, with each rank's partition of the reduced gradients in place:

* Before it runs, the gradients are read from the partitions (:class:`ZeroPartition`): the
  reduced gradients before DeepSpeed unscales and clips them, times 1/S under fp16.
* Inside it, DeepSpeed updates its loss scale (``_update_scale``) once it knows whether the
  gradients overflowed, while they are still intact: a skipped step's NaN/Inf are counted there.
* After it, the step is counted and ended: the loss scale before and after, whether the
  update was skipped, and the factor DeepSpeed scaled the gradients by (clipping).

The loss is what ``engine.backward(loss)`` differentiates, ``loss / gradient_accumulation_steps``
(``scale_wrt_gas``, the default), summed over the step's micro-batches: the loss whose gradient
the step applies. ``engine.scale(loss)`` before a direct ``backward()`` counts the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from numwatch.capture.deepspeed import EngineAdapter
from numwatch.capture.guard import Guard
from numwatch.step import records
from numwatch.step.ledger import StepLedger
from numwatch.step.measurement import StepMeasurement
from numwatch.step.reading import learning_rates
from numwatch.step.sites import StepSite


def _scale_wrt_gas(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # engine.backward(loss, retain_graph=False, scale_wrt_gas=True)
    return bool(kwargs.get("scale_wrt_gas", args[1] if len(args) > 1 else True))


class DeepSpeedSite(StepSite):
    """A DeepSpeed engine: its ZeRO optimizer's ``step()`` reads, counts and ends each step."""

    def __init__(self, ledger: StepLedger, guard: Guard, adapter: EngineAdapter) -> None:
        super().__init__(ledger, guard, adapter.optimizer)
        self.adapter = adapter
        adapter.patch(adapter.optimizer, "step", self._wrap_step)
        adapter.patch(adapter.optimizer, "_update_scale", self._wrap_update_scale)
        adapter.patch(adapter.engine, "backward", self._wrap_backward)
        adapter.patch(adapter.engine, "scale", self._wrap_scale)

    def remove(self) -> None:
        super().remove()
        self.adapter.restore()

    def scaling(self) -> tuple[float | None, None]:
        """(gradient multiplier, format multiplier) for the gradients as DeepSpeed holds them:
        1/S under fp16 (the format counts are about the stored g·S)."""
        scale = self.adapter.loss_scale()
        return (1.0 / scale if scale != 1.0 else None), None

    # -- the loss ------------------------------------------------------------------------

    def _add_loss(self, loss: torch.Tensor, divisor: int) -> None:
        self.ledger.seal_ended()  # a backward belongs to the next step
        self.ledger.current().add_losses([loss.detach() / divisor])

    def _wrap_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        capture = self.guard("engine.backward wrapper", self._add_loss)

        def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                divided = _scale_wrt_gas((loss, *args), kwargs)
                capture(loss, self.adapter.accumulation_steps() if divided else 1)
            return original(loss, *args, **kwargs)

        return backward

    def _wrap_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        capture = self.guard("engine.scale wrapper", self._add_loss)

        def scale(loss: torch.Tensor) -> Any:
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                # The engine divides the gradients of a direct backward by the accumulation steps.
                capture(loss, self.adapter.accumulation_steps())
            return original(loss)

        return scale

    # -- the step ------------------------------------------------------------------------

    def _wrap_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        before = self.guard("DeepSpeed step wrapper", self._before_step)
        after = self.guard("DeepSpeed step wrapper", self._after_step)

        def step(*args: Any, **kwargs: Any) -> Any:
            measurement = self.ledger.current()
            scale = self.adapter.loss_scale()
            before(measurement)
            result = original(*args, **kwargs)
            self.ledger.count_step()  # an attempt counts even when measuring it fails
            after(measurement, scale)
            return result

        return step

    def _before_step(self, measurement: StepMeasurement) -> None:
        self.ledger.seal_ended()
        measurement.read(self.ledger.watched, *self.scaling())
        measurement.lr = learning_rates(self.optimizer)
        # DeepSpeed is about to unscale, clip and free them: the last moment to count NaN/Inf (when due).
        self.ledger.reader.count_nonfinite_if_due(measurement, None)

    def _wrap_update_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        count = self.guard("DeepSpeed loss-scale wrapper", self._count_overflow)

        def update_scale(has_overflow: bool = False, *args: Any, **kwargs: Any) -> Any:
            if has_overflow:
                count()
            return original(has_overflow, *args, **kwargs)

        return update_scale

    def _count_overflow(self) -> None:
        """The gradients overflowed (every rank knows it): count their NaN/Inf before DeepSpeed frees them."""
        measurement = self.ledger.under_way
        if measurement is not None and measurement.reading is not None:
            self.ledger.watched.count_nonfinite(measurement.reading)

    def _after_step(self, measurement: StepMeasurement, scale_before: float) -> None:
        skipped = self.adapter.overflowed()

        def prepare() -> None:
            if measurement.reading is None:
                return  # failed: the step ends discarded
            device = self.ledger.watched.device
            # Filled on the device from host numbers: no host-to-device copy to wait for.
            measurement.parts[records.FOUND_INF] = torch.full((), float(skipped), device=device)
            if self.adapter.loss_scaled:
                measurement.parts[records.LOSS_SCALE] = torch.full((), scale_before, device=device)
                measurement.parts[records.NEW_LOSS_SCALE] = torch.full((), self.adapter.loss_scale(), device=device)
            factor = None if skipped else self.adapter.applied_factor(scale_before)
            if factor is not None:
                measurement.clip_effect().norms.mul_(factor)
            self._add_weight_parts(measurement)

        self._end_counted(prepare, skip_known=skipped)
