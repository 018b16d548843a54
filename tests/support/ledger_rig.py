"""A step ledger wired as the watcher wires it, around a real model, for the step-level tests."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from numwatch.capture.guard import Guard
from numwatch.capture.scaler import ScalerAdapter
from numwatch.delivery.nonfinite import NonFiniteError
from numwatch.formats import format_spec
from numwatch.step.ledger import StepLedger
from numwatch.step.measurement import Cadence, WatchedTensors, select_parameters
from numwatch.step.reading import GradientReader
from numwatch.step.records import StepRecord


@dataclass
class RecordingChecker:
    """Stands in for the non-finite check: records each check (step, gradients?) and raises
    NonFiniteError at the steps in ``raise_at``, as ``on_nonfinite="raise"`` would."""

    raise_at: set[int] = field(default_factory=set)
    checked: list[tuple[int, bool]] = field(default_factory=list)
    seen_at: float = -math.inf

    def check(self, record: StepRecord, gradients: bool = True) -> None:
        self.checked.append((record.step_number, gradients))
        if record.step_number in self.raise_at:
            raise NonFiniteError(f"step {record.step_number}")


@dataclass
class LedgerRig:
    model: nn.Module
    watched: WatchedTensors
    reader: GradientReader
    ledger: StepLedger
    guard: Guard
    checker: RecordingChecker
    submitted: list[StepRecord]

    def numbers(self) -> list[int]:
        """Step numbers of the records handed to the transport, in order."""
        return [record.step_number for record in self.submitted]


def ledger_rig(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    defer_checks: bool = False,
    histogram_every: int = 0,
    quant_every: int = 0,
    raise_at: set[int] | None = None,
) -> LedgerRig:
    selected = select_parameters(model, None, None)
    watched = WatchedTensors(selected, format_spec("fp16"), Cadence(histogram_every, 0, quant_every))
    checker = RecordingChecker(raise_at or set())
    adapter = ScalerAdapter(scaler) if scaler is not None else None
    reader = GradientReader(watched, adapter, checker, optimizer)
    submitted: list[StepRecord] = []
    ledger = StepLedger(reader, checker, submitted.append, defer_checks=defer_checks)
    guard = Guard(ledger.fail, passthrough=(NonFiniteError,))
    return LedgerRig(model, watched, reader, ledger, guard, checker, submitted)


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    """The model's mean squared error on a fixed batch (a graph to backpropagate)."""
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 4, generator=generator), torch.randn(6, 2, generator=generator)
    return (model(x) - y).pow(2).mean()


def backward(model: nn.Module, seed: int) -> torch.Tensor:
    """One forward and backward on a fixed batch; the loss."""
    loss = loss_of(model, seed)
    loss.backward()
    return loss.detach()


def float64_norms(tensors: list[torch.Tensor]) -> np.ndarray:
    """Per-tensor L2 norms in float64, independently of numwatch's kernels."""
    return np.array([math.sqrt(float((t.detach().double() ** 2).sum())) for t in tensors])
