"""The step ledger: the step counter, the step being measured, and where every step is on its way out.

A watcher keeps one :class:`StepLedger`. Each step it knows of is a :class:`LedgerEntry` in
one :class:`Stage`, and moves only by the transitions below; every entry point checks the
stage first, as ``torch.amp.GradScaler`` checks its ``OptState`` per optimizer::

    MEASURING -count-> COUNTED -end-> ENDED -seal-> SEALED -hand on-> HANDED_ON
                          |                           |
                          +-discard-> DISCARDED       +-wait for host copy-> AWAITING_HOST -hand on-> HANDED_ON

* MEASURING: the step under way, opened by its first backward, a ``watcher.log`` call or the
  step site. Backwards read its gradients into its
  :class:`~numwatch.step.measurement.StepMeasurement`, which also knows whether monitoring
  failed in it.
* COUNTED: the step site counted the attempt (:attr:`StepLedger.steps`). It ends at once, or
  after the optimizer's update (to measure the updated weights, or when a closure runs the
  backward inside ``optimizer.step``).
* ENDED: its record exists and its one host copy has started. ``watcher.log`` values still
  go to it, until the model's next forward (or the next read of the gradients, a flush, close).
* SEALED: it takes no more values; it is checked for non-finite values and handed on.
* AWAITING_HOST: on accelerators the check reads the host copy, so a sealed step waits here
  until the next step ends (or a flush, close); by then the copy has landed and the check
  does not wait on the device.
* HANDED_ON: queued to the transport.
* DISCARDED: monitoring failed in it; nothing is recorded.

A transition out of order is logged with its name and the stage the step was in, and not
made; nothing is raised into training. (A count out of order still counts the attempt: the
step site saw an optimizer step.)
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from numwatch.capture.activations import ActivationTracer
from numwatch.capture.clipping import ClipEffect
from numwatch.capture.forward_probe import ForwardProbe
from numwatch.capture.gemm import GemmProbe
from numwatch.capture.local_grads import LocalProbe
from numwatch.step.measurement import StepMeasurement, WatchedTensors
from numwatch.step.reading import GradientReader
from numwatch.step.records import StepRecord

log = logging.getLogger("numwatch")


class Stage(enum.Enum):
    MEASURING = "measuring"
    COUNTED = "counted"
    ENDED = "ended"
    SEALED = "sealed"
    AWAITING_HOST = "awaiting its host copy"
    HANDED_ON = "handed on"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class Transition:
    """A named move from any of ``sources`` to ``target``."""

    name: str
    sources: frozenset[Stage]
    target: Stage


COUNT = Transition("count", frozenset({Stage.MEASURING}), Stage.COUNTED)
END = Transition("end", frozenset({Stage.COUNTED}), Stage.ENDED)
DISCARD = Transition("discard", frozenset({Stage.COUNTED}), Stage.DISCARDED)
SEAL = Transition("seal", frozenset({Stage.ENDED}), Stage.SEALED)
WAIT_FOR_HOST_COPY = Transition("wait for host copy", frozenset({Stage.SEALED}), Stage.AWAITING_HOST)
HAND_ON = Transition("hand on", frozenset({Stage.SEALED, Stage.AWAITING_HOST}), Stage.HANDED_ON)
TRANSITIONS = (COUNT, END, DISCARD, SEAL, WAIT_FOR_HOST_COPY, HAND_ON)


def out_of_order(transition: Transition, situation: str) -> None:
    """Log a transition that cannot be made now (``situation`` says why); never raises."""
    log.warning("numwatch: step ledger: %r out of order (%s); not made", transition.name, situation)


class LedgerEntry:
    """One step: its measurement while it is measured, then its record, and its stage."""

    def __init__(self, measurement: StepMeasurement) -> None:
        self.number = measurement.number
        self.stage = Stage.MEASURING
        self.record: StepRecord | None = None
        self._measurement: StepMeasurement | None = measurement

    @property
    def measurement(self) -> StepMeasurement:
        """The step's measurement, while it is MEASURING or COUNTED."""
        assert self._measurement is not None, f"step {self.number} is {self.stage.value}: no measurement any more"
        return self._measurement

    def take_measurement(self) -> StepMeasurement:
        """The measurement, released: once ended, the step no longer holds its gradients alive."""
        measurement, self._measurement = self.measurement, None
        return measurement

    def allows(self, transition: Transition) -> bool:
        """Whether ``transition`` can be made now; logged when it cannot."""
        if self.stage in transition.sources:
            return True
        out_of_order(transition, f"step {self.number} is {self.stage.value}")
        return False

    def advance(self, transition: Transition) -> bool:
        """Make ``transition``; one out of order is logged and not made (False)."""
        if not self.allows(transition):
            return False
        self.stage = transition.target
        return True


class Checker(Protocol):
    """The non-finite check a step passes before it is handed on (with on_nonfinite="raise" it raises)."""

    def check(self, record: StepRecord, gradients: bool = True) -> None: ...


class StepLedger:
    """Owns the step counter, the step under way and the steps not yet handed to the transport.

    ``submit`` queues a record to the transport; ``defer_checks`` (accelerators) keeps a sealed
    step until the next step ends before its host copy is read. The tracer's, the probe's and the
    gemm probe's per-step values join the step when it ends.
    """

    def __init__(
        self,
        reader: GradientReader,
        checker: Checker,
        submit: Callable[[StepRecord], None],
        *,
        defer_checks: bool,
        tracer: ActivationTracer | None = None,
        probe: ForwardProbe | None = None,
        gemm: GemmProbe | None = None,
        local: LocalProbe | None = None,
        replicated_by: int | None = None,
    ) -> None:
        self.reader = reader
        self._checker = checker
        self._submit = submit
        self._defer_checks = defer_checks
        self._tracer = tracer
        self._probe = probe
        self._gemm = gemm
        self._local = local  # ranks: this rank's gradient before the reduction
        self._replicated_by = replicated_by  # ranks: the rank sending the replicated statistics, when not this one
        self._steps = 0
        self._under_way: LedgerEntry | None = None  # MEASURING or COUNTED
        self._ended: LedgerEntry | None = None  # ENDED: takes late watcher.log values
        self._awaiting: LedgerEntry | None = None  # AWAITING_HOST
        self._last: LedgerEntry | None = None  # the last step that ended with a record (close() may supplement it)
        self._supplement: StepRecord | None = None  # statistics close() measured for a step already sealed
        self._last_end: float | None = None  # perf_counter() when the last recorded step ended

    @property
    def steps(self) -> int:
        """Optimizer-step attempts counted (skipped ones included)."""
        return self._steps

    @property
    def watched(self) -> WatchedTensors:
        return self.reader.watched

    @property
    def under_way(self) -> StepMeasurement | None:
        """The measurement of the step under way (MEASURING or COUNTED), if any."""
        return self._under_way.measurement if self._under_way is not None else None

    def stage_of(self, number: int) -> Stage | None:
        """The stage of step ``number`` while the ledger holds it (the step under way, the one
        that ended, the one awaiting its host copy, the last one that ended); else None."""
        for entry in (self._under_way, self._ended, self._awaiting, self._last):
            if entry is not None and entry.number == number:
                return entry.stage
        return None

    # -- the step under way ---------------------------------------------------------------

    def current(self) -> StepMeasurement:
        """The measurement of the step under way, opened for the next step number if none."""
        if self._under_way is None:
            self._under_way = LedgerEntry(StepMeasurement(self._steps + 1))
        return self._under_way.measurement

    def counted(self) -> StepMeasurement | None:
        """The step under way when it is counted and not ended yet (it ends after the optimizer's update)."""
        entry = self._under_way
        return entry.measurement if entry is not None and entry.stage is Stage.COUNTED else None

    def count_step(self) -> StepMeasurement:
        """Count one optimizer-step attempt: the step under way (opened if none) is COUNTED."""
        measurement = self.current()
        self._steps += 1
        assert self._under_way is not None
        self._under_way.advance(COUNT)
        return measurement

    def fail(self) -> None:
        """Monitoring failed: the step under way drops everything, and records nothing when it ends."""
        if self._under_way is not None:
            self._under_way.measurement.fail()

    def read_gradients(self) -> StepMeasurement:
        """Read the gradients into the step under way (a backward ended, or the adapter says they are
        ready); the step that ended before takes no more logged values."""
        self.seal_ended()
        measurement = self.current()
        self.reader.read(measurement)
        self.reader.count_nonfinite_if_due(measurement, None)
        return measurement

    def end_step(self, skip_known: bool | None) -> None:
        """End the counted step under way: its record starts its host copy and takes late logs.

        ``skip_known``: whether the GradScaler skipped it, when the host knows.
        """
        entry = self._under_way
        if entry is None:
            out_of_order(END, "no step under way")
            return
        if not entry.allows(END):
            return
        self._under_way = None
        measurement = entry.take_measurement()
        module_parts = self._tracer.take_step(self.watched.device) if self._tracer is not None else None
        forward_parts = self._probe.take_step() if self._probe is not None else None
        gemm = self._gemm.take_step() if self._gemm is not None else None
        local = self._local.take() if self._local is not None else None  # ranks
        if local is not None:
            measurement.parts.update(local.parts)
        if measurement.reading is None:
            entry.advance(DISCARD)  # monitoring failed in this step (counted in monitoring_errors)
            return
        self.reader.count_nonfinite_if_due(measurement, skip_known)
        now = time.perf_counter()
        entry.record = measurement.finish(
            self.watched,
            step_time=now - self._last_end if self._last_end is not None else None,
            module_parts=module_parts,
            forward_parts=forward_parts,
            gemm=gemm,
        )
        entry.record.local, entry.record.replicated_by = (local.meta if local else None), self._replicated_by  # ranks
        self._last_end = now
        entry.advance(END)
        self.seal_ended()
        self._hand_on_awaiting()
        self._ended = self._last = entry
        if not self._defer_checks:
            # Before the update, where the step site allows; gradients already seen finite are not read again.
            self._checker.check(entry.record, gradients=measurement.reading.finite is not True)

    # -- values logged late ----------------------------------------------------------------

    def log(self, scalars: dict[str, Any]) -> None:
        """``watcher.log`` values: to the step that ended while it is ENDED, else to the step under way."""
        entry = self._ended
        if entry is not None and entry.stage is Stage.ENDED and entry.record is not None:
            entry.record.log_late(scalars)
        else:
            self.current().log(scalars)

    def seal_ended(self) -> None:
        """The step that ended takes no more values: check it and hand it on, or on accelerators
        keep it until its host copy is read."""
        entry, self._ended = self._ended, None
        if entry is None or entry.record is None or not entry.advance(SEAL):
            return
        logged_late = entry.record.seal()
        if self._defer_checks:
            entry.advance(WAIT_FOR_HOST_COPY)
            waiting, self._awaiting = self._awaiting, entry
            if waiting is not None:  # one step waits at a time; an earlier one goes first
                self._check_and_hand_on(waiting)
            return
        try:
            if logged_late:
                self._checker.check(entry.record, gradients=False)  # its gradients were checked when it ended
        finally:
            self._hand_on(entry)

    # -- what the clip observer reports (numwatch.capture.clipping.ClipTarget) --------------

    def gradient_columns(self) -> list[int] | None:
        """Schema indices of the gradients read for the step under way, in column order (None:
        all tensors); [] when they were not read."""
        measurement = self.under_way
        reading = measurement.reading if measurement is not None else None
        return reading.present if reading is not None else []

    def before_clip(self) -> None:
        """A clip function is about to rewrite the step's gradients: the last moment to count their NaN/Inf."""
        measurement = self.under_way
        if measurement is not None and measurement.reading is not None:
            # On accelerators the GradScaler's verdict is still on the device (reading it would wait
            # for the device): the usual rule decides.
            self.reader.count_nonfinite_if_due(measurement, None)

    def clip_effect(self) -> ClipEffect:
        measurement = self.under_way
        assert measurement is not None
        return measurement.clip_effect()

    def norms_now(self) -> torch.Tensor:
        """The per-tensor L2 norms of the step's read gradients as they are now (after a value clip)."""
        measurement = self.under_way
        assert measurement is not None and measurement.reading is not None
        return self.reader.norms_now(measurement.reading)

    # -- handing on ------------------------------------------------------------------------

    def _hand_on(self, entry: LedgerEntry) -> None:
        if entry.record is not None and entry.advance(HAND_ON):
            self._submit(entry.record)

    def _check_and_hand_on(self, entry: LedgerEntry) -> None:
        """Check a step whose host copy it waited for (may raise NonFiniteError), then queue it."""
        try:
            if entry.record is not None:
                self._checker.check(entry.record)
        finally:
            self._hand_on(entry)

    def _hand_on_awaiting(self) -> None:
        entry, self._awaiting = self._awaiting, None
        if entry is not None:
            self._check_and_hand_on(entry)

    def settle(self) -> None:
        """Seal the step that ended and hand on every sealed one (flush, close)."""
        self.seal_ended()
        self._hand_on_awaiting()

    @property
    def last_record(self) -> StepRecord | None:
        """The record of the last step that ended with one."""
        return self._last.record if self._last is not None else None

    def add_final_parts(self, parts: dict[str, torch.Tensor]) -> None:
        """Statistics measured after the last step ended (close(): the final weights). An ENDED
        step takes them into its record; a sealed one gets a supplement sent behind it, which
        the collector merges into the stored step."""
        entry = self._last
        if entry is None or entry.record is None:
            return
        if entry.stage is Stage.ENDED:
            entry.record.add_late_parts(parts)
        else:
            self._supplement = entry.record.supplemented(parts)

    def close(self) -> None:
        """Hand on every step (a check may raise NonFiniteError), then the last step's supplement."""
        self.settle()
        supplement, self._supplement = self._supplement, None
        if supplement is not None:
            self._submit(supplement)  # behind the step it supplements
