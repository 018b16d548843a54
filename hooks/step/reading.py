"""How the watched gradients are read into a step: unscaled from the GradScaler's S, NaN/Inf counted when due.

NaN/Inf counts are only meaningful for tensors whose norm is not finite, and are taken when
that is known without a host-device sync: on CPU (reading is free) when the norms are read;
on accelerators on sampled steps, for a while after non-finite values were seen, and on a
step the (non-fused) GradScaler skipped, which the host knows. A clip rewrites the gradients:
they are counted before one (on accelerators by the same rule: the GradScaler's verdict is still
on the device then), never after.
"""

from __future__ import annotations

from typing import Protocol

import torch

from numwatch.capture.scaler import ScalerAdapter
from numwatch.kernels.device import accelerator_path
from numwatch.step.measurement import GradientReading, StepMeasurement, WatchedTensors

# Accelerators count NaN/Inf per tensor for this many steps after non-finite values were seen.
NONFINITE_RECOUNT_STEPS = 10


class NonFiniteHistory(Protocol):
    """Where non-finite values were last seen (the watcher's non-finite check)."""

    @property
    def seen_at(self) -> float:
        """The last step whose values were not finite (-inf: none yet)."""
        ...


def learning_rates(optimizer: torch.optim.Optimizer | None) -> list[float]:
    """The rates the coming update uses, one per param group."""
    return [float(group["lr"]) for group in optimizer.param_groups] if optimizer is not None else []


class GradientReader:
    """Reads the watched gradients into a step's measurement.

    ``optimizer`` is the watched one (None until a framework builds it): the GradScaler keeps
    its unscale state per optimizer.
    """

    def __init__(
        self,
        watched: WatchedTensors,
        scaler: ScalerAdapter | None,
        history: NonFiniteHistory,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self.watched = watched
        self.scaler = scaler
        self.optimizer = optimizer
        self._history = history

    def scaling(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(gradient multiplier, format multiplier) for gradients read now (see ScalerAdapter.scaling)."""
        return self.scaler.scaling(self.optimizer) if self.scaler is not None else (None, None)

    def read(self, measurement: StepMeasurement) -> None:
        """Read the gradients as they are now into ``measurement`` (replacing an earlier read)."""
        measurement.read(self.watched, *self.scaling())

    def norms_now(self, reading: GradientReading) -> torch.Tensor:
        """The per-tensor L2 norms of the reading's gradients as they are now (after a value clip)."""
        return self.watched.norms_now(reading, self.scaling()[0])

    def count_nonfinite_if_due(self, measurement: StepMeasurement, skip_known: bool | None) -> None:
        """Add the per-tensor NaN/Inf counts of the read gradients, when they are due (see the module docstring).

        ``skip_known``: the GradScaler's verdict when the host knows it (True: it skipped the step).
        """
        reading = measurement.reading
        if reading is None or not reading.grads or reading.has_counts or measurement.clip is not None:
            return  # (after a clip the gradients are no longer the ones read)
        if not accelerator_path(self.watched.device):
            due = not reading.all_finite()  # the norms are ordinary host memory: reading them costs no sync
        elif skip_known is not None:
            due = skip_known  # the GradScaler's verdict, read on the host already
        else:
            # Reading this step's norms would synchronise, and counting every tensor every step
            # costs ~4 kernel launches per tensor (+10 ms per step for 100 tensors on an H100).
            # Count on sampled steps and while non-finite gradients were seen lately; the
            # per-tensor norms flag every non-finite tensor at every step regardless.
            due = (
                self.watched.cadence.sampled(measurement.number)
                or self._history.seen_at >= measurement.number - NONFINITE_RECOUNT_STEPS
            )
        if due:
            self.watched.count_nonfinite(reading)
