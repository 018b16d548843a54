"""Each rank's own gradient before the data-parallel reduction (DDP, DeepSpeed ZeRO): its norm, NaN/Inf, compute time.

After the all-reduce every rank holds the same gradient, so one rank's NaN is every rank's
NaN and a slow rank looks like every other. Before it, the gradient is the rank's own: the
sum over the micro-batches it accumulated (under ``no_sync``) of its own data's gradients,
which is what DDP hands to the reduction. Two ways to see it:

* A communication hook (the default): DDP passes each bucket of local gradients, flattened,
  to one hook. The probe's hook measures the bucket and then runs the hook DDP would have
  run: a hook the user registers later (``register_comm_hook`` on the DDP module is wrapped,
  so fp16/bf16 compression, PowerSGD... still apply, unchanged), else DDP's own mean
  all-reduce. A few kernels per bucket, one Python call per bucket.
* Tensor hooks on the parameters, when a hook was registered before ``watch()``: DDP takes
  one hook and keeps it, so it cannot be wrapped. Each parameter's hook sees its gradient
  before it is accumulated and adds what was accumulated so far: the same local gradient,
  at one Python call and a few kernels per parameter (slower; documented).

Measured per bucket (or parameter), on the device, without host syncs: each tensor's L2
norm (``_foreach_norm``, as ``clip_grad_norm_``), the count of NaN/Inf elements, and on
sampled steps the bit-pattern sum of the weights (:mod:`numwatch.kernels.replica`), which
must be equal on every rank. The compute time runs from the first forward of the wrapped
module (after DDP's own pre-forward collectives) to the last bucket of the synchronising
backward that follows being handed to the reduction, before any wait on it; a step with
several synchronising backwards adds up those spans, so the waits between them stay out:
host time on CPU, CUDA events on GPUs (read with the step's host copy, a step later). Only
backwards that synchronise count; when several do within one optimizer step (accumulation
without ``no_sync``, or a loop that skipped the optimizer step after a non-finite gradient)
the last one's norms are the step's, and the NaN/Inf count adds up all of them, so a
non-finite backward is never hidden by a later one.

Limits: DDP's python reducer and compiled DDP (which call hooks per parameter, not per
bucket) are not probed; a ``Join`` context's changed divisor is not followed by the default
all-reduce; a builtin C++ hook registered after ``watch()`` is refused (use its Python twin).

Under DeepSpeed ZeRO (:class:`ZeroLocalProbe`) a hook on each parameter sees the rank's own
gradient before DeepSpeed's hooks take it for the reduction: full-shape in every stage, in
the model's dtype, times the loss scale under fp16 (divided out here). With
``gradient_accumulation_steps`` above 1, ZeRO-1 keeps the rank's own sum of the earlier
micro-batches' gradients until the boundary, and the last micro-batch's hook adds its own
to it; ZeRO-2/3 reduce every micro-batch, so the rank's own sum never exists and is not
measured (no number would be exact). The compute time is not
measured: ZeRO's collectives run inside the forward (stage 3's parameter gathers) and the
backward (the reductions), so a rank's forward-backward time includes waiting for the
slowest rank. The weights' checksum is taken under stages 1 and 2, where every rank holds
them whole. FSDP2 (:class:`FsdpLocalProbe`) is read the same way, from its unsharded
parameters, with the same two omissions.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

import torch
import torch.distributed as dist
from torch import nn

from numwatch.capture.guard import Guard
from numwatch.kernels.device import accelerator_path
from numwatch.kernels.replica import bit_sum

# Part names in the step's device stack.
LOCAL_NORMS = "local:norms"  # float32 [t]: each local gradient's L2 norm, tensors in LocalMeta.names order
LOCAL_NONFINITE = "local:nonfinite"  # int64: NaN/Inf elements of the local gradient
LOCAL_CHECKSUM = "local:checksum"  # int64: bit-pattern sum of the replicated weights (sampled steps)

Future = torch.futures.Future[torch.Tensor]
CommHook = Callable[[Any, Any], Future]


@dataclass
class LocalMeta:
    """The host side of one step's local health."""

    names: list[str]  # tensors of the LOCAL_NORMS entries
    sampled: bool
    seconds: float | None = None  # compute time measured on the host (CPU)
    events: list[tuple[Any, Any]] | None = None  # (start, end) CUDA events of each synchronising backward

    def compute_time(self) -> float | None:
        """Seconds of forward + backward before the reduction (None when not measured)."""
        if self.events is not None:
            if not all(end.query() for _, end in self.events):
                return None
            return float(sum(start.elapsed_time(end) for start, end in self.events)) / 1000.0
        return self.seconds


@dataclass
class LocalStep:
    parts: dict[str, torch.Tensor]
    meta: LocalMeta


@dataclass
class _Backward:
    """What the buckets (or parameters) of the synchronising backward under way handed over."""

    norms: list[torch.Tensor] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    start: Any = None  # the first forward's since the previous synchronising backward
    end: Any = None


class LocalProbe(Protocol):
    """What the step ledger takes from a local-health probe at the end of each step."""

    def take(self) -> LocalStep | None: ...

    def remove(self) -> None: ...


def nonfinite_elements(tensor: torch.Tensor) -> torch.Tensor:
    """float64 scalar: the NaN/Inf elements of ``tensor``, in two ops (``isfinite().sum()`` takes
    five): x·0 is NaN exactly there, and the 0-"norm" counts the elements that are not 0."""
    count: torch.Tensor = torch.linalg.vector_norm(tensor.mul(0), 0, dtype=torch.float64)
    return count


def counted_if_not_finite(tensor: torch.Tensor, norms: torch.Tensor) -> torch.Tensor | None:
    """``tensor``'s NaN/Inf elements, given the norms of what it holds; None for none.

    Each count is another pass over the gradients' memory, which on a CPU costs as much as the
    norm itself: there the norms are read (free: no device to wait for) and only a tensor whose
    norm is not finite is counted. On accelerators it is counted on the device, with no host sync."""
    if accelerator_path(tensor.device):
        return nonfinite_elements(tensor)
    # The norms' sum is finite when all of them are (one that overflows is counted: still exact).
    if not math.isfinite(float(norms if norms.dim() == 0 else norms.sum())):
        return nonfinite_elements(tensor)
    return None


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` is the root of an FSDP2 ``fully_shard`` tree."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_ddp(model: nn.Module) -> TypeGuard[nn.parallel.DistributedDataParallel]:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _strip(name: str) -> str:
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


class LocalGradProbe:
    """Per-step local health of a DDP-wrapped model (see the module docstring)."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, sampled: Callable[[], bool], guard: Guard) -> None:
        self.ddp = ddp
        self._sampled = sampled
        self._names = {id(p): _strip(name) for name, p in ddp.module.named_parameters()}
        self._cuda = next(ddp.module.parameters()).device.type == "cuda"
        self._start: Any = None
        self._spans: list[tuple[Any, Any]] = []  # (start, end) of this step's earlier synchronising backwards
        self._backward: _Backward | None = None
        self._counts: list[torch.Tensor] = []  # NaN/Inf counts of every synchronising backward of the step
        self._fresh = True  # a forward ran since the last bucket: the next bucket starts a backward
        self._syncing = False  # the last forward prepared a synchronising backward (tensor-hook mode)
        self._sampling = False
        self._inner: tuple[CommHook, Any] | None = None
        self._removed = False
        self._measure = guard("local gradient probe", self._measure_tensors)
        self._handles = [
            ddp.register_forward_pre_hook(guard("local gradient probe", self._before_ddp_forward)),
            ddp.module.register_forward_pre_hook(guard("local gradient probe", self._before_forward)),
        ]
        self.mode = "comm_hook"
        try:
            dist._register_comm_hook(ddp.reducer, None, self._comm_hook)  # type: ignore[attr-defined]
        except RuntimeError:
            # A hook is registered already (DDP keeps the first): read each parameter's gradient instead.
            self.mode = "tensor_hooks"
            self._handles += [
                p.register_hook(functools.partial(self._tensor_hook, p))
                for p in ddp.module.parameters()
                if p.requires_grad
            ]
        else:
            # Not in ddp._comm_hooks, which compiled DDP calls per parameter: there the user's hook runs alone.
            ddp.register_comm_hook = self._register_user_hook  # type: ignore[method-assign]
            ddp._register_builtin_comm_hook = self._refuse_builtin_hook  # type: ignore[method-assign]

    # -- DDP's side ----------------------------------------------------------------------

    def _register_user_hook(self, state: object, hook: CommHook) -> None:
        """``ddp.register_comm_hook`` after watch(): the user's hook runs inside the probe's."""
        self.ddp._check_comm_hook(hook)
        if self._inner is not None:
            raise RuntimeError("register_comm_hook can only be called once (numwatch wraps the one registered)")
        self._inner = (hook, state)
        self.ddp._comm_hooks.append((hook, state))

    def _refuse_builtin_hook(self, comm_hook_type: Any) -> None:
        raise RuntimeError(
            "numwatch: a builtin DDP communication hook cannot be registered after numwatch.watch(); register "
            "its Python equivalent (torch.distributed.algorithms.ddp_comm_hooks.default_hooks) or register it first"
        )

    def _comm_hook(self, state: object, bucket: Any) -> Future:
        if not self._removed:
            self._measure(bucket.gradients(), bucket.parameters(), bucket.is_last(), bucket.buffer())
        if self._inner is not None:
            hook, inner_state = self._inner
            result: Future = hook(inner_state, bucket)
            return result
        return self._mean_all_reduce(bucket)

    def _mean_all_reduce(self, bucket: Any) -> Future:
        """What DDP does without a hook: divide by the group's size as it would, then sum across the group."""
        buffer = bucket.buffer()
        group = self.ddp.process_group
        size = dist.get_world_size(group)
        if self.ddp.gradient_as_bucket_view:
            buffer.div_(size)
        else:
            buffer.mul_(1.0 / size)
        work = dist.all_reduce(buffer, group=group, async_op=True)
        assert work is not None
        reduced: Future = work.get_future().then(lambda fut: fut.value()[0])
        return reduced

    def _tensor_hook(self, parameter: torch.Tensor, grad: torch.Tensor) -> None:
        if self._syncing and not self._removed:
            local = grad if parameter.grad is None else parameter.grad + grad
            self._measure([local], [parameter], True, local)

    # -- measuring ---------------------------------------------------------------------------

    def _before_ddp_forward(self, module: nn.Module, args: Any) -> None:
        self._fresh = True
        self._syncing = torch.is_grad_enabled() and bool(self.ddp.require_backward_grad_sync)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._start is None and torch.is_grad_enabled():
            self._start = self._now()

    def _now(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _measure_tensors(
        self, grads: list[torch.Tensor], parameters: list[torch.Tensor], last: bool, flat: torch.Tensor
    ) -> None:
        """Measure local gradients ``grads`` (of ``parameters``; ``flat``: all their elements, one tensor)."""
        if self._fresh:
            self._fresh = False
            if self._backward is not None and self._backward.start is not None and self._backward.end is not None:
                self._spans.append((self._backward.start, self._backward.end))  # an earlier one of this step
            self._backward = _Backward(start=self._start)
            self._start = None  # the next synchronising backward's span starts at its own forward
            self._sampling = bool(self._sampled())
        backward = self._backward
        assert backward is not None
        with torch.no_grad():
            norms = torch._foreach_norm(grads)
            stacked = torch.stack(norms).float() if len(norms) > 1 else norms[0].float().reshape(1)
            backward.norms.append(stacked)
            count = counted_if_not_finite(flat, stacked)
            if count is not None:
                self._counts.append(count)
            if self._sampling:
                backward.sums.append(bit_sum(parameters))
        backward.names += [self._names.get(id(p), "?") for p in parameters]
        if last:
            backward.end = self._now()

    def take(self) -> LocalStep | None:
        """The step's local health (device parts and host meta), or None without a synchronising backward."""
        backward, self._backward = self._backward, None
        counts, self._counts = self._counts, []
        spans, self._spans = self._spans, []
        self._start = None
        self._fresh = True
        if backward is None or not backward.norms:
            return None
        parts = {LOCAL_NORMS: torch.cat(backward.norms), LOCAL_NONFINITE: _total(counts)}
        if backward.sums:
            parts[LOCAL_CHECKSUM] = torch.stack(backward.sums).sum()
        meta = LocalMeta(backward.names, self._sampling)
        if backward.start is not None and backward.end is not None:
            spans.append((backward.start, backward.end))
        if spans:
            if self._cuda:
                meta.events = spans
            else:
                meta.seconds = sum(end - start for start, end in spans)
        return LocalStep(parts, meta)

    def remove(self) -> None:
        """Stop measuring. A registered communication hook stays (DDP cannot drop it) and only forwards."""
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Accumulated(Protocol):
    """Where a rank's own gradient is kept, summed over the micro-batches, until the boundary."""

    def boundary(self, parameter: torch.Tensor) -> bool:
        """Whether the backward under way reduces ``parameter``'s gradient (the last micro-batch's)."""
        ...

    def held(self, parameter: torch.Tensor) -> torch.Tensor | None:
        """The parameter's own gradient summed over the earlier micro-batches (None: none yet)."""
        ...


class ZeroLocalProbe:
    """Per-step local health under DeepSpeed ZeRO: each parameter's own gradient as autograd
    hands it over (see the module docstring)."""

    def __init__(
        self,
        module: nn.Module,
        loss_scale: Callable[[], float],
        sampled: Callable[[], bool],
        guard: Guard,
        *,
        replicated: bool,
        accumulated: Accumulated | None = None,
        hook_parameters: bool = True,
    ) -> None:
        self._loss_scale = loss_scale
        self._accumulated = accumulated
        self._sampled = sampled
        named: list[tuple[str, torch.Tensor]] = []
        if hook_parameters:
            named = [(_strip(name), p) for name, p in module.named_parameters() if p.requires_grad]
        # Stages 1 and 2 keep every weight whole on every rank: its checksum must agree.
        self._replicated = [p for _, p in named] if replicated else None
        self._fresh = True
        self._scale = 1.0
        self._sampling = False
        self._norms: list[torch.Tensor] = []
        self._names: list[str] = []
        self._nonfinite: list[torch.Tensor] = []  # per parameter, of every backward of the step
        self._checksum: torch.Tensor | None = None
        self._measure_guarded = guard("local gradient probe", self._measure)
        self._handles = [module.register_forward_pre_hook(guard("local gradient probe", self._before_forward))]
        self._hook(named)

    def _hook(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._handles += [p.register_hook(functools.partial(self._measure_guarded, name, p)) for name, p in named]

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._fresh = True

    def _measure(self, name: str, parameter: torch.Tensor, grad: torch.Tensor) -> None:
        if self._accumulated is not None:
            if not self._accumulated.boundary(parameter):
                return  # an earlier micro-batch: in what the boundary's backward adds its own to
            held = self._accumulated.held(parameter)
            if held is not None:
                grad = held.view_as(grad) + grad
        if self._fresh:
            # A backward's first gradient: as for DDP, the step's norms are its last backward's.
            self._fresh = False
            self._norms, self._names = [], []
            self._scale = self._loss_scale()
            self._sampling = bool(self._sampled())
            if self._sampling and self._replicated is not None:
                self._checksum = bit_sum(self._replicated)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
            self._norms.append(norm)
            count = counted_if_not_finite(grad, norm)
            if count is not None:
                self._nonfinite.append(count)
        self._names.append(name)

    def take(self) -> LocalStep | None:
        """The step's local health, or None when no backward ran since the last step."""
        norms, self._norms = self._norms, []
        nonfinite, self._nonfinite = self._nonfinite, []
        checksum, self._checksum = self._checksum, None
        self._fresh = True
        if not norms:
            return None
        with torch.no_grad():
            stacked = torch.stack(norms)
            if self._scale != 1.0:
                stacked.mul_(1.0 / self._scale)
            parts = {LOCAL_NORMS: stacked, LOCAL_NONFINITE: _total(nonfinite)}
        if checksum is not None:
            parts[LOCAL_CHECKSUM] = checksum
        return LocalStep(parts, LocalMeta(self._names, self._sampling))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _total(counts: list[torch.Tensor]) -> torch.Tensor:
    """int64 scalar: the sum of ``counts`` (0 for none)."""
    if not counts:
        return torch.zeros((), dtype=torch.int64)
    return (torch.stack(counts).sum() if len(counts) > 1 else counts[0]).to(torch.int64)


class FsdpLocalProbe(ZeroLocalProbe):
    """Per-step local health under FSDP2 (``fully_shard``): each unsharded parameter's gradient
    as autograd hands it over, before FSDP reduce-scatters it (see the module docstring).

    The unsharded parameters exist from each group's first all-gather on, and FSDP keeps them:
    their hooks are added when the first forward with gradients has ended. With gradient sync
    off (``set_requires_gradient_sync(False)``) FSDP keeps the rank's own sum over the
    micro-batches, in the unsharded gradient or its accumulated copy in the reduce dtype; the
    backward that reduces adds its own gradient to that sum."""

    def __init__(self, module: nn.Module, sampled: Callable[[], bool], guard: Guard) -> None:
        super().__init__(module, lambda: 1.0, sampled, guard, replicated=False, accumulated=self, hook_parameters=False)
        self._handles.append(module.register_forward_hook(guard("local gradient probe", self._after_forward)))
        self._groups: dict[int, Any] = {}  # id(unsharded parameter) -> (its FSDP param group, its FSDPParam)
        self._attached = False

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._attached or not torch.is_grad_enabled():
            return
        self._attached = True
        named = []
        for submodule in module.modules():
            state = getattr(submodule, "_get_fsdp_state", None)
            group = state()._fsdp_param_group if state is not None else None
            for fsdp_param in group.fsdp_params if group is not None else ():
                unsharded = fsdp_param._unsharded_param
                if unsharded.requires_grad:
                    self._groups[id(unsharded)] = (group, fsdp_param)
                    named.append((_strip(fsdp_param._param_fqn), unsharded))
        self._hook(named)

    def boundary(self, parameter: torch.Tensor) -> bool:
        group, _ = self._groups[id(parameter)]
        return bool(group.reduce_grads)

    def held(self, parameter: torch.Tensor) -> torch.Tensor | None:
        _, fsdp_param = self._groups[id(parameter)]
        accumulated: torch.Tensor | None = getattr(fsdp_param, "unsharded_accumulated_grad", None)
        return accumulated if accumulated is not None else parameter.grad
