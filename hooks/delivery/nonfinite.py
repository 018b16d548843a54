"""What the watcher does when a measured step holds NaN/Inf: an event, a warning or an error."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from numwatch import protocol
from numwatch.capture.activations import ActivationTracer
from numwatch.step import records
from numwatch.step.records import StepRecord

log = logging.getLogger("numwatch")

ON_NONFINITE = ("warn", "raise", "ignore")
# How many offending tensors a warning, error or event names.
NAMED_TENSORS = 10


class NonFiniteError(FloatingPointError):
    """A gradient or the loss was NaN/Inf (raised with ``on_nonfinite="raise"``)."""


class RepeatLimiter:
    """Logs a warning once, then only counts identical repeats until a different one."""

    def __init__(self) -> None:
        self._last_key: Any = None
        self._repeats = 0

    def warn(self, key: Any, message: str) -> None:
        if key == self._last_key:
            self._repeats += 1
            return
        self.report_repeats()
        self._last_key = key
        log.warning(message)

    def report_repeats(self) -> None:
        if self._repeats:
            log.warning("numwatch: the previous warning repeated %d more times", self._repeats)
        self._repeats = 0


class NonFiniteCheck:
    """Looks at each step's host values once: the first non-finite step gets a
    ``nonfinite_origin`` event; every one warns (rate-limited) or raises."""

    def __init__(self, run: str, tensor_names: list[str], on_nonfinite: str, tracer: ActivationTracer | None) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, not {on_nonfinite!r}")
        self.run = run
        self.tensor_names = tensor_names
        self.on_nonfinite = on_nonfinite
        self.tracer = tracer
        self.warnings = RepeatLimiter()
        self.reported = False
        self.seen_at = -math.inf  # last step whose values were not finite

    def check(self, record: StepRecord, gradients: bool = True) -> None:
        """Check the record's gradients (unless ``gradients`` is False) and loss; may raise."""
        bad = []
        if gradients:
            finite = np.isfinite(record.grad_rows()[0])
            if not finite.all():
                bad = [int(i) for i in record.present_indices()[~finite]]
        loss = record.loss_value()
        loss_bad = loss is not None and not math.isfinite(loss)
        if not bad and not loss_bad:
            return
        self.seen_at = max(self.seen_at, record.step_number)
        counts = self._counts_by_tensor(record, bad)
        offenders = [
            {"name": self.tensor_names[i], "nan": nan, "inf": inf}
            for i, (nan, inf) in list(counts.items())[:NAMED_TENSORS]
        ]
        module = None
        if self.tracer is not None and records.ACTIVATION_ABSMAX in record.host:
            module = self.tracer.first_nonfinite_module(record.host.get(records.ACTIVATION_ABSMAX), record.module_order)
        if not self.reported:
            self.reported = True
            details = {
                "tensors": offenders,
                "nonfinite_tensors": len(bad),
                "loss": protocol.encode_float(loss),
                "module": module,
            }
            record.events.append(protocol.event_document(record.step_number, "nonfinite_origin", details))
        described = ", ".join(f"{o['name']} (nan={o['nan']}, inf={o['inf']})" for o in offenders) or "all finite"
        more = f" and {len(bad) - len(offenders)} more" if len(bad) > len(offenders) else ""
        origin = f"; first non-finite module output: {module}" if module else ""
        message = (
            f"numwatch: non-finite values at step {record.step_number} of run {self.run!r}: loss={loss}; "
            f"gradients: {described}{more}{origin}"
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        if self.on_nonfinite == "warn":
            self.warnings.warn(("nonfinite", tuple(bad), loss_bad), message)

    @staticmethod
    def _counts_by_tensor(record: StepRecord, bad: list[int]) -> dict[int, tuple[int | None, int | None]]:
        counts = record.nonfinite_rows()
        if counts is None:
            return {i: (None, None) for i in bad}
        position = {int(i): column for column, i in enumerate(record.present_indices())}
        return {i: (int(counts[0, position[i]]), int(counts[1, position[i]])) for i in bad}
