"""Opt-in activation tracing: per-module output absmax and where a NaN was born.

Forward hooks on the leaf modules keep, per module, the largest |output| seen since the
last optimizer step as a device tensor (``vector_norm(ord=inf)``: one pass, NaN and Inf
propagate, so a non-finite absmax *is* the non-finite flag) and, on the host, the order
in which modules first ran in the step. Nothing is read back here: the absmax vector
joins the step's single host copy.
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
        self._absmax: list[torch.Tensor | None] = []
        self._first_seen: list[int] = []  # module indices in order of first call this step
        self._handles: list[RemovableHandle] = []
        for name, module in model.named_modules():
            if next(module.children(), None) is not None:
                continue
            index = len(self.module_names)
            self.module_names.append(name or type(module).__name__)
            self._absmax.append(None)
            self._handles.append(module.register_forward_hook(self._hook_for(index)))

    def _hook_for(self, index: int) -> Any:
        def record_output(module: nn.Module, inputs: Any, output: Any) -> None:
            outputs = _floating_outputs(output)
            if not outputs:
                return
            with torch.no_grad():
                absmax = torch.stack([torch.linalg.vector_norm(t.detach(), math.inf, dtype=torch.float32) for t in outputs]).amax()
                previous = self._absmax[index]
                if previous is None:
                    self._first_seen.append(index)
                    self._absmax[index] = absmax
                else:
                    self._absmax[index] = torch.maximum(previous, absmax)  # NaN propagates

        return record_output

    def take_step(self, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """This step's absmax per module (0 for modules that did not run) and the order
        modules first ran; resets for the next step."""
        zero = torch.zeros((), dtype=torch.float32, device=device)
        absmax = torch.stack([zero if a is None else a.to(device) for a in self._absmax]) if self._absmax else zero.reshape(0)
        order = self._first_seen
        self._absmax = [None] * len(self._absmax)
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
