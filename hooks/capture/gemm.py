"""The operands of every linear matmul of sampled steps, and what low precision would do to them.

A ``TorchFunctionMode`` entered for the forwards of sampled steps (``gemm_every``) sees every
call of ``torch.nn.functional.linear`` — ``nn.Linear``, custom modules calling ``F.linear``,
``nn.MultiheadAttention``'s projections — whose weight is a watched parameter. Of each call it
keeps X (the input, as passed: before autocast casts it) and W; a hook on the output receives dY
in the backward. :mod:`numwatch.kernels.lowp` measures them in batches (X and W at the forward's
end, dY at the step's end, and whenever the operands held reach ``PENDING_ELEMENTS``): the ops
do not grow with the number of layers, and nothing reaches the host here. The step's numbers
join its single host copy, one column per watched tensor (the Linear's weight): calls of one
weight over the step (micro-batches, a layer used twice) keep the lowest SQNR and the largest
range, and their shares are over all their elements; W is measured once per step.

Matmuls not written as ``F.linear`` (``x @ w.T``, ``torch.matmul``, ``torch.addmm``, fused or
compiled kernels) are not seen, nor are calls whose weight is no watched parameter.

Of an operand with more than ``rows`` rows (tokens of X and dY, output features of W), ``rows`` evenly
spaced rows are quantized, under the scales of the whole operand (its amax is read whole): the SQNR
and shares are then estimates from those rows (:func:`numwatch.kernels.lowp.operand_sums`), at a
cost that no longer grows with the tokens per step. ``rows=0`` quantizes every row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, redispatch_function
from torch.utils.hooks import RemovableHandle

from numwatch import protocol
from numwatch.kernels import lowp

# Elements of operands held for a batched measurement before it runs early (bounds the memory of
# the dY kept past their use; X is mostly saved for the backward anyway).
PENDING_ELEMENTS = 1 << 26
# Rows of an operand quantized per call by default: on the CPU a measured step then costs about half
# a training step of the benchmark GPT (benchmarks/gemm_readiness.py); the SQNR estimate's spread
# on Gaussian operands is a few tenths of a dB.
ROWS = 32
# Python-level torch functions that call F.linear inside: the mode is re-entered for their bodies.
_CALLS_LINEAR_INSIDE = (F.multi_head_attention_forward,)
_PER_TENSOR = {"x": "e4m3", "w": "e4m3", "dy": "e5m2"}


class _Operands:
    """One operand kind's measurements of a step: pending tensors, then measured sums per batch."""

    def __init__(self, per_tensor: str, rows: int) -> None:
        self.per_tensor = per_tensor
        self.rows = rows
        self.pending: list[tuple[int, torch.Tensor]] = []  # (weight index, tensor)
        self.pending_elements = 0
        self.sums: list[torch.Tensor] = []  # [SUM_ROWS, calls] per measured batch
        self.owners: list[int] = []  # the weight index of each measured column, in order

    def add(self, index: int, tensor: torch.Tensor) -> bool:
        """Hold ``tensor``; whether the held operands reached the limit."""
        self.pending.append((index, tensor.detach()))
        self.pending_elements += tensor.numel()
        return self.pending_elements >= PENDING_ELEMENTS

    @torch.no_grad()
    def measure(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.pending_elements = self.pending, [], 0
        self.sums.append(lowp.operand_sums([tensor for _, tensor in pending], self.per_tensor, self.rows))
        self.owners += [index for index, _ in pending]

    def take(self, n: int) -> torch.Tensor | None:
        """float32 [STAT_ROWS, n] of the step's calls (NaN for weights without any); resets."""
        self.measure()
        sums, owners = self.sums, self.owners
        self.sums, self.owners = [], []
        if not sums:
            return None
        return lowp.readiness(sums[0] if len(sums) == 1 else torch.cat(sums, 1), owners, n)

    def clear(self) -> None:
        self.pending, self.pending_elements, self.sums, self.owners = [], 0, [], []


class GemmCapture(TorchFunctionMode):
    """While entered, records the operands of each ``F.linear`` call whose weight is one of ``weights``
    (their positions are the columns of :meth:`take_step`). ``failed(site)`` is told about any
    exception, which never reaches the model; the step's measurements are then dropped."""

    def __init__(self, weights: Sequence[torch.Tensor], failed: Callable[[str], None], rows: int = ROWS) -> None:
        super().__init__()
        self._index = {id(weight): i for i, weight in enumerate(weights)}
        self._n = len(weights)
        self._failed = failed
        self._operands = {operand: _Operands(_PER_TENSOR[operand], rows) for operand in protocol.GEMM_OPERANDS}
        self._weights_seen: set[int] = set()
        self._step_failed = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            # Inside a graph dynamo traces, recording would be a side effect it cannot keep: compiled
            # regions' matmuls are not measured (docs/lowp.md), rather than the graph broken.
            return func(*args, **kwargs)
        if func in _CALLS_LINEAR_INSIDE:
            with self:
                return redispatch_function(func, types, args, kwargs)
        result = func(*args, **kwargs)
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            index = self._index.get(id(weight))
            if index is not None and isinstance(weight, torch.Tensor):
                self._record(index, args[0] if args else kwargs["input"], weight, result)
        return result

    def _record(self, index: int, x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> None:
        if self._step_failed:
            return
        try:
            if self._operands["x"].add(index, x):
                self._measure_forward()
            if index not in self._weights_seen:
                self._weights_seen.add(index)
                if self._operands["w"].add(index, weight):
                    self._measure_forward()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._gradient_hook(index))
        except Exception:
            self._fail("gemm capture")

    def _gradient_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def take_gradient(gradient: torch.Tensor) -> None:
            if self._step_failed:
                return
            try:
                dy = self._operands["dy"]
                if dy.add(index, gradient):
                    dy.measure()
            except Exception:
                self._fail("gemm capture (backward)")

        return take_gradient

    def _measure_forward(self) -> None:
        self._operands["x"].measure()
        self._operands["w"].measure()

    def forward_ended(self) -> None:
        """Measure the forward's X and W (at most one set of ops per (device, dtype) for all layers)."""
        if self._step_failed:
            return
        try:
            self._measure_forward()
        except Exception:
            self._fail("gemm capture")

    def _fail(self, site: str) -> None:
        self._step_failed = True
        for operands in self._operands.values():
            operands.clear()
        self._failed(site)

    def take_step(self) -> torch.Tensor | None:
        """float32 [len(protocol.GEMM_STATS), n] of this step (None when nothing was seen); resets."""
        failed, self._step_failed = self._step_failed, False
        self._weights_seen = set()
        if failed:
            for operands in self._operands.values():
                operands.clear()
            return None
        try:
            parts = {operand: self._operands[operand].take(self._n) for operand in protocol.GEMM_OPERANDS}
        except Exception:
            self._fail("gemm capture")
            self._step_failed = False
            return None
        present = [part for part in parts.values() if part is not None]
        if not present:
            return None
        nan = torch.full((lowp.STAT_ROWS, self._n), float("nan"), device=present[0].device)
        return torch.cat([nan if part is None else part.to(nan.device, non_blocking=True) for part in parts.values()])


class GemmProbe:
    """Enters a :class:`GemmCapture` for the forwards (with gradients) for which ``due()`` is true."""

    def __init__(
        self,
        model: nn.Module,
        weights: Sequence[torch.Tensor],
        due: Callable[[], bool],
        failed: Callable[[str], None],
        rows: int = ROWS,
    ) -> None:
        self.capture = GemmCapture(weights, failed, rows)
        self._due = due
        self._failed = failed
        self._depth = 0  # > 0 while a measured forward runs (a model may call itself)
        self._handles: list[RemovableHandle] = [
            # Eager even in a compiled model: entering the mode is no part of the traced graph.
            model.register_forward_pre_hook(torch.compiler.disable(self._before)),
            model.register_forward_hook(torch.compiler.disable(self._after), always_call=True),
        ]

    def _before(self, module: nn.Module, inputs: Any) -> None:
        if self._depth:
            self._depth += 1
            return
        try:
            if torch.is_grad_enabled() and self._due():
                self.capture.__enter__()  # type: ignore[no-untyped-call]  # unannotated in torch
                self._depth = 1
        except Exception:
            self._failed("gemm forward pre-hook")

    def _after(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if not self._depth:
            self._leave()

    def _leave(self) -> None:
        self._depth = 0
        try:
            self.capture.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # as in _before
        finally:
            self.capture.forward_ended()

    def take_step(self) -> torch.Tensor | None:
        """The step's readiness of every watched Linear weight's matmul operands; resets."""
        return self.capture.take_step()

    def remove(self) -> None:
        """Remove the hooks (and leave a forward in progress unmeasured)."""
        if self._depth:
            self._leave()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
