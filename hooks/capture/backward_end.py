"""Run a function when a backward pass through a module's outputs has finished.

Frameworks clip gradients right after the backward, before ``optimizer.step()``, and offer
no callback in between (the Hugging Face Trainer). The end of the backward is the last
moment the gradients are what ``clip_grad_norm_`` will see: a forward hook marks the
module's outputs, the first of them reached by the backward queues a callback on the
autograd engine, and that callback re-queues itself once, so it runs after the callbacks
the frameworks queued during the backward (DDP's and FSDP's gradient reductions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def _output_tensors(output: Any) -> Iterator[torch.Tensor]:
    """Tensors in a module's output (tensors, tuples, lists, dicts and ModelOutput-like mappings)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _output_tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _output_tensors(value)


class BackwardEndTrigger:
    """Calls ``callback()`` once at the end of every backward pass that reaches ``module``'s
    outputs, and ``on_forward()`` (when given) after every forward that records a graph."""

    def __init__(
        self, module: nn.Module, callback: Callable[[], None], on_forward: Callable[[], None] | None = None
    ) -> None:
        self._callback = callback
        self._on_forward = on_forward
        self._queued_task = -1  # graph task the callback is queued for
        # Eager under torch.compile too (see numwatch.capture.forward_probe): never traced.
        self._handle = module.register_forward_hook(torch.compiler.disable(self._mark_outputs))

    def _mark_outputs(self, module: nn.Module, args: Any, output: Any) -> None:
        # Recomputation inside a backward (activation checkpointing) is not a new step.
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return
        if self._on_forward is not None:
            self._on_forward()
        for tensor in _output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(self._output_reached)

    def _output_reached(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._queued_task:
            self._queued_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._after_queued_callbacks)

    def _after_queued_callbacks(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._callback)

    def remove(self) -> None:
        """Stop marking outputs."""
        self._handle.remove()
