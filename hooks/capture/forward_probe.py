"""The forward-pass measurements of sampled steps: attention logits and output log Z.

Two hooks on the watched (root) module run at every forward and only compare the step
number with the cadence. On a forward of a step that is due (with gradients enabled: an
evaluation forward under ``torch.no_grad()`` is not the training step's), the attention
capture is entered for the forward's duration and the logits are taken from its output
(or from the output of ``logits_module``). Micro-batches of one step add up; the watcher
takes the step's values when it ends the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from numwatch.capture.attention import LOGIT_CHUNK_ELEMENTS, AttentionCapture, AttentionMaxima
from numwatch.capture.output_logits import LogZ, find_logits


class ForwardProbe:
    """Measures the forwards for which ``due()`` is true. ``failed(site)`` is told about any
    exception, which never reaches the model (a forward always computes what it would), and
    the step's forward measurements are then dropped whole."""

    def __init__(
        self,
        model: nn.Module,
        due: Callable[[], bool],
        failed: Callable[[str], None],
        logits_module: str | None = None,
        chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
    ) -> None:
        self._logits_source = None
        if logits_module is not None:
            try:
                self._logits_source = model.get_submodule(logits_module)
            except AttributeError:
                raise ValueError(
                    f"logits_module={logits_module!r}: {type(model).__name__} has no such submodule"
                ) from None
        self._due = due
        self._report_failure = failed
        self._step_failed = False
        self.capture = AttentionCapture(model, chunk_elements, self._failed)
        self.log_z = LogZ(chunk_elements)
        self._depth = 0  # > 0 while a measured forward runs (a model may call itself)
        self._logits_handle: RemovableHandle | None = None
        # Under torch.compile the root module's hooks run as frames of their own: they run eagerly,
        # never traced (no graph break, no guard on numwatch's state).
        self._handles = [
            model.register_forward_pre_hook(torch.compiler.disable(self._before)),
            model.register_forward_hook(torch.compiler.disable(self._after), always_call=True),
        ]

    def _before(self, module: nn.Module, inputs: Any) -> None:
        if self._depth:
            self._depth += 1
            return
        try:
            if not torch.is_grad_enabled() or not self._due():
                return
            self._depth = 1
            self.capture.begin()
            if self._logits_source is not None:
                self._logits_handle = self._logits_source.register_forward_hook(self._logits_seen)
        except Exception:
            self._stop()
            self._failed("forward pre-hook")

    def _failed(self, site: str) -> None:
        self._step_failed = True
        self._report_failure(site)

    def _after(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        self._stop()
        if self._logits_source is None:
            self._take_logits(output)

    def _logits_seen(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._take_logits(output)

    def _take_logits(self, output: Any) -> None:
        try:
            logits = find_logits(output)
            if logits is not None:
                self.log_z.add(logits)
        except Exception:
            self._failed("output logits")

    def _stop(self) -> None:
        self._depth = 0
        self.capture.end()
        if self._logits_handle is not None:
            self._logits_handle.remove()
            self._logits_handle = None

    def take_step(self) -> tuple[AttentionMaxima, torch.Tensor | None]:
        """The step's max logit per attention call and its [mean log Z, max log Z, max |logit|]; resets."""
        measured = self.capture.take_step(), self.log_z.take_step()
        if self._step_failed:
            self._step_failed = False
            return AttentionMaxima([], None), None
        return measured

    def remove(self) -> None:
        """Remove the hooks (and leave a forward in progress unmeasured)."""
        if self._depth:
            self._stop()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
