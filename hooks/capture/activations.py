"""Opt-in activation tracing: per-module output absmax and where a NaN was born.

Forward hooks on the leaf modules keep, per module, the smallest and largest output value
seen since the last optimizer step as device tensors and, on the host, the order in which
modules first ran in the step. Each output costs one ``aminmax``: one read, no |x|
materialised (``vector_norm(ord=inf)`` materialises it on the CPU, where it was most of
the tracing cost), NaN and Inf propagate. The step's absmax vector, max(max, -min) per
module (so a non-finite absmax *is* the non-finite flag), is formed once per step with a
few ops and joins the step's single host copy; nothing is read back here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _floating_outputs(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() and output.numel() else []
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _floating_outputs(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _floating_outputs(item)]
    return []


class ActivationTracer:
    """Forward hooks on every leaf module of ``model`` (registration order = module order)."""

    def __init__(self, model: nn.Module) -> None:
        self.module_names: list[str] = []
        self._ranges: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # (min, max) per module this step
        self._first_seen: list[int] = []  # module indices in order of first call this step
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if next(module.children(), None) is not None:
                continue
            index = len(self.module_names)
            self.module_names.append(name or type(module).__name__)
            self._ranges.append(None)
            self._handles.append(module.register_forward_hook(self._hook_for(index)))

    def _hook_for(self, index: int) -> Any:
        def record_output(module: nn.Module, inputs: Any, output: Any) -> None:
            outputs = _floating_outputs(output)
            if not outputs:
                return
            with torch.no_grad():
                for tensor in outputs:
                    low, high = torch.aminmax(tensor)
                    previous = self._ranges[index]
                    if previous is None:
                        self._first_seen.append(index)
                        self._ranges[index] = (low, high)
                    else:  # a module called again, or with several outputs (rare): NaN propagates
                        self._ranges[index] = (torch.minimum(previous[0], low), torch.maximum(previous[1], high))

        return record_output

    def take_step(self, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """This step's absmax per module (0 for modules that did not run) and the order
        modules first ran; resets for the next step."""
        if not self._ranges:
            return torch.zeros(0, dtype=torch.float32, device=device), []
        zero = torch.zeros((), dtype=torch.float32, device=device)
        lows = torch.stack([zero if r is None else r[0].to(device, non_blocking=True) for r in self._ranges]).float()
        highs = torch.stack([zero if r is None else r[1].to(device, non_blocking=True) for r in self._ranges]).float()
        absmax = torch.maximum(highs, lows.neg_())  # NaN propagates
        order = self._first_seen
        self._ranges = [None] * len(self._ranges)
        self._first_seen = []
        return absmax, order

    def first_nonfinite_module(self, absmax: Any, order: list[int]) -> str | None:
        """Name of the first module, in forward execution order, whose output was non-finite."""
        for index in order:
            if not math.isfinite(float(absmax[index])):
                return self.module_names[index]
        return None

    def remove(self) -> None:
        """Remove every forward hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
