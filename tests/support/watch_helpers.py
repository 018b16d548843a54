"""Shared pieces of the watcher tests: small models and reading back what a watcher spooled."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from numwatch import protocol
from numwatch.delivery.spool import iter_spool
from tests.support.collector_docs import values


@dataclass
class Spooled:
    """Everything one (run, rank) spool directory holds, decoded."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    histograms: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    def stat(self, step: dict[str, Any], name: str) -> np.ndarray:
        """A per-tensor statistic of a step document as a numpy array."""
        n = len(self.runs[0]["tensors"])
        return values(step["tensors"][name], protocol.TENSOR_STATS[name], n)


def read_spool(directory: Path) -> Spooled:
    """Decode a spool directory (documents in write order)."""
    spooled = Spooled()
    for kind, body in iter_spool(directory):
        if kind == "run":
            spooled.runs.append(body)
            continue
        spooled.steps.extend(body["steps"])
        spooled.histograms.extend(body["histograms"])
        spooled.events.extend(body["events"])
        spooled.statuses.append(body["status"])
    return spooled


def run_spool(root: Path, run: str, rank: int = 0) -> Spooled:
    """What the one process that watched ``run`` spooled under ``root`` (one directory per process)."""
    (directory,) = Path(root).glob(f"{run}.*/rank{rank}")
    return read_spool(directory)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def reference_norms(grads: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """float64 L2 norm and absmax per tensor, computed independently of numwatch.kernels.stats."""
    as64 = [g.detach().to(torch.float64).numpy().ravel() for g in grads]
    return np.array([np.sqrt(np.sum(a * a)) for a in as64]), np.array([np.max(np.abs(a)) for a in as64])


class BackwardInjection:
    """Writes values into a parameter's gradient inside the backward, at chosen steps: the
    way a real overflow arrives (numwatch reads the gradients when the backward ends)."""

    def __init__(
        self, parameter: torch.Tensor, index: tuple, values: list[float], steps: set[int] | None = None
    ) -> None:
        self.step = 0
        self.index, self.values, self.steps = index, values, steps
        parameter.register_hook(self._inject)

    def _inject(self, grad: torch.Tensor) -> torch.Tensor:
        if self.steps is not None and self.step not in self.steps:
            return grad
        grad = grad.clone()
        grad[self.index] = torch.tensor(self.values, dtype=grad.dtype)
        return grad
