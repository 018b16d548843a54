"""``numwatch.watch``: measure a training run's numeric health at every optimizer step.

Where the numbers are taken (ARCHITECTURE §1):

* With an enabled ``torch.amp.GradScaler``: when ``scaler.update()`` runs (the instance's
  ``update`` is wrapped). The scaler has unscaled the gradients by then, also on a skipped
  step. Fused optimizers (``_step_supports_amp_scaling``) are the exception: the scaler
  hands them the scale and they unscale inside their kernel, writing the unscaled values
  back into ``.grad`` only when the step is not skipped. So for them the gradients are
  measured in the optimizer step pre-hook, where they are still scaled by S on every
  step, with ``multiplier=1/S`` (S read from the scaler's scale tensor, no sync).
* Without a scaler: in the optimizer step pre-hook (after accumulation and the DDP
  all-reduce); sampled steps finish in the step post-hook, once the update is applied.
* Without an optimizer: when ``watcher.step()`` is called.
* Frameworks that clip between backward and ``optimizer.step()`` (Hugging Face, Lightning)
  call ``watcher.gradients_ready()`` before clipping: the step is measured there, as
  ``clip_grad_norm_`` sees it. With ``measure="manual"`` (frameworks that run the backward
  inside ``optimizer.step(closure)``) only that call measures and ``watcher.finish_step()``
  ends the step.
* Sharded (DTensor, FSDP2) parameters: each rank measures its shard and
  :mod:`numwatch.sharded` combines them into whole-tensor statistics.

NaN/Inf counts are only meaningful for tensors whose norm is not finite, and are taken
when that is known without a host-device sync: on CPU (reading is free) after looking at
the norms; with a non-fused scaler on the (rare) skipped step, which the host already
knows (the optimizer's step pre-hook did not run); otherwise (CUDA without a scaler, or a
fused optimizer, where the Inf flag is only on the device) they are counted on the device
at every step: one extra read of the gradients is cheaper than a sync per step, and the
gradients are gone by the time the host could look. On devices other than the CPU the
host copy of a step is read at the next step, so ``on_nonfinite`` acts one step late there.
"""

from __future__ import annotations

import atexit
import fnmatch
import json
import logging
import math
import os
import time
import weakref
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.amp.grad_scaler import OptState

from numwatch import protocol, records, stats
from numwatch.activations import ActivationTracer
from numwatch.formats import FormatSpec, format_name_for_dtype, format_spec
from numwatch.forward_probe import ForwardProbe
from numwatch.hostcopy import DeviceStack
from numwatch.records import StepRecord, histogram_part
from numwatch.sharded import ShardReduction, local_tensor, refuse_unsupported
from numwatch.spool import default_spool_root, spool_directory
from numwatch.transport import Transport

log = logging.getLogger("numwatch")

ON_NONFINITE = ("warn", "raise", "ignore")
MEASURE_MODES = ("auto", "manual")
# How many offending tensors a warning, error or event names.
NAMED_TENSORS = 10
# Accelerators count NaN/Inf per tensor for this many steps after non-finite values were seen.
NONFINITE_RECOUNT_STEPS = 10

_watched_models: "weakref.WeakKeyDictionary[nn.Module, Watcher]" = weakref.WeakKeyDictionary()


class NonFiniteError(FloatingPointError):
    """A gradient or the loss was NaN/Inf (raised with ``on_nonfinite="raise"``)."""


class _RepeatLimiter:
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


def _select_parameters(model: nn.Module, include: Iterable[str] | None, exclude: Iterable[str] | None) -> list[tuple[str, nn.Parameter]]:
    include = [include] if isinstance(include, str) else list(include) if include is not None else None
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    chosen = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        chosen.append((name, parameter))
    return chosen


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _default_run_name(model: nn.Module, world_size: int) -> str:
    """``NUMWATCH_RUN``, else model class and start time; rank 0's name on every rank."""
    name = os.environ.get("NUMWATCH_RUN") or f"{type(model).__name__}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if world_size > 1:
        names = [name]
        torch.distributed.broadcast_object_list(names, src=0)
        name = names[0]
    return name


def unwrap_optimizer(optimizer: Any, scaler: torch.amp.GradScaler | None) -> tuple[torch.optim.Optimizer | None, torch.amp.GradScaler | None]:
    """The torch optimizer inside a framework wrapper (Accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``: ``.optimizer``), and the wrapper's GradScaler when
    none is given. The wrapper's own ``step`` may skip accumulation steps or run no hooks."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner, scaler if scaler is not None else getattr(optimizer, "scaler", None)
    return optimizer, scaler


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, allow_nan=False)) if value is not None else {}


class Watcher:
    """Watches one model (and optimizer, scaler); create it with :func:`watch`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        scaler: torch.amp.GradScaler | None,
        run: str | None,
        url: str | None,
        token: str | None,
        project: str | None,
        histogram_every: int,
        format_every: int,
        attention_every: int | None,
        logits_module: str | None,
        format: str | None,
        on_nonfinite: str,
        measure: str,
        trace_activations: bool,
        include: Iterable[str] | None,
        exclude: Iterable[str] | None,
        spool_dir: str | os.PathLike[str] | None,
        config: dict[str, Any] | None,
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, not {on_nonfinite!r}")
        if measure not in MEASURE_MODES:
            raise ValueError(f"measure must be one of {MEASURE_MODES}, not {measure!r}")
        refuse_unsupported(model, optimizer)
        if model in _watched_models:
            raise RuntimeError(f"this {type(model).__name__} is already watched (run {_watched_models[model].run!r}); close() that watcher first")
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.histogram_every = histogram_every
        self.format_every = format_every
        self.attention_every = histogram_every if attention_every is None else attention_every
        if self.attention_every < 0:
            raise ValueError(f"attention_every must be >= 0 (0 turns it off), not {self.attention_every}")
        self.on_nonfinite = on_nonfinite
        self.measure = measure
        self._selected = _select_parameters(model, include, exclude)
        if not self._selected:
            raise ValueError("no trainable parameter matches include/exclude: nothing to watch")
        self._sharding = ShardReduction.for_parameters(self._selected)
        self.tensor_names = [name for name, _ in self._selected]
        self._parameters = [parameter for _, parameter in self._selected]
        self.device = self._parameters[0].device
        self.format: FormatSpec = format_spec(format or ("fp16" if self.scaler else format_name_for_dtype(self._parameters[0].dtype)))
        self.rank, self.world_size = _distributed_rank()
        self.run = run or _default_run_name(model, self.world_size)
        self._fused = bool(optimizer is not None and getattr(optimizer, "_step_supports_amp_scaling", False))
        if self.scaler is not None and {"update", "scale"} & set(vars(self.scaler)):
            raise RuntimeError("this GradScaler's update/scale are already patched (watched by another watcher?)")
        self.tracer = ActivationTracer(model) if trace_activations else None
        # The forward of step N runs before the step is counted: it belongs to steps + 1.
        self.probe = ForwardProbe(model, lambda: self._forward_due(self.steps + 1), self._note_failure, logits_module) if self.attention_every > 0 else None

        self.steps = 0  # optimizer-step attempts seen (skipped ones included)
        self.monitoring_errors = 0
        self._failed_sites: set[str] = set()
        self._warnings = _RepeatLimiter()
        self._nonfinite_reported = False
        self._nonfinite_seen_at = -NONFINITE_RECOUNT_STEPS - 1  # last step whose host copy showed non-finite values
        self._loss_parts: list[torch.Tensor] = []
        self._logged: dict[str, Any] = {}
        self._stack: DeviceStack | None = None  # a step's measurements in progress
        self._snapshot: list[torch.Tensor] | None = None
        self._step_ran = False
        self._skip_known: bool | None = None  # manual mode: the scaler's verdict until finish_step()
        self._grads: list[torch.Tensor] = []  # the step's gradients (those not None)
        self._present: list[int] | None = None  # their schema indices; None: all
        self._grad_stats = torch.zeros((2, 0))
        self._lr: list[float] = []  # learning rates of the step being measured
        self._pending: StepRecord | None = None  # measured, host copy not yet read
        self._last_step_clock: float | None = None
        self._handles: list[Any] = []
        self._patched: list[str] = []
        self._closed = False

        root = spool_dir if spool_dir is not None else default_spool_root()
        self.spool_dir = spool_directory(root, self.run, self.rank)
        self.transport = Transport(
            self._run_document(project, config),
            url=url if url is not None else os.environ.get("NUMWATCH_URL") or None,
            token=token if token is not None else os.environ.get("NUMWATCH_TOKEN") or None,
            spool_dir=self.spool_dir,
        )
        if self.transport.url is None:
            try:
                self.transport.open_spool()
            except OSError:
                # Not fatal to training: every step will be counted in dropped_steps.
                log.exception("numwatch: cannot write the spool %s", self.spool_dir)
        self._install()
        _watched_models[model] = self
        atexit.register(self._close_at_exit)

    # -- setup ------------------------------------------------------------------------

    def _run_document(self, project: str | None, config: dict[str, Any] | None) -> dict[str, Any]:
        groups = {}
        if self.optimizer is not None:
            for index, group in enumerate(self.optimizer.param_groups):
                groups.update({id(p): index for p in group["params"]})
        # group -1: the parameter is in no param group of the watched optimizer
        tensors: list[protocol.TensorSpec] = [
            {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "group": groups.get(id(p), -1)} for n, p in self._selected
        ]
        config = {
            "model": type(self.model).__name__,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "grad_scaler": self.scaler is not None,
            "fused_optimizer": self._fused,
            "sharded": self._sharding is not None,
            "histogram_every": self.histogram_every,
            "format_every": self.format_every,
            "attention_every": self.attention_every,
            "torch": torch.__version__,
            "user": _json_safe(config),
        }
        return protocol.run_document(
            self.run, rank=self.rank, world_size=self.world_size, format=self.format.name, tensors=tensors,
            project=project or os.environ.get("NUMWATCH_PROJECT") or "default",
            modules=self.tracer.module_names if self.tracer else [], config=config,
        )

    def _install(self) -> None:
        if self.optimizer is not None:
            # Manual mode without a scaler: the step pre-hook may run before the backward (closures).
            if self.scaler is not None or self.measure == "auto":
                self._handles.append(self.optimizer.register_step_pre_hook(self._guarded("step pre-hook", self._before_optimizer_step)))
            if self.scaler is None and self.measure == "auto":
                self._handles.append(self.optimizer.register_step_post_hook(self._guarded("step post-hook", self._after_optimizer_step)))
        if self.scaler is not None:
            self._patch_scaler("update", self._wrap_update)
            self._patch_scaler("scale", self._wrap_scale)

    def _patch_scaler(self, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        assert self.scaler is not None
        setattr(self.scaler, name, wrapper(getattr(self.scaler, name)))
        self._patched.append(name)

    def _guarded(self, site: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """Monitoring never breaks training: failures are logged once per site and counted."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except NonFiniteError:
                raise
            except Exception:
                self._count_failure(site)
                return None

        return guarded

    def _count_failure(self, site: str) -> None:
        self._stack = None
        self._snapshot = None
        self._note_failure(site)

    def _note_failure(self, site: str) -> None:
        self.monitoring_errors += 1
        if site not in self._failed_sites:
            self._failed_sites.add(site)
            log.exception("numwatch: monitoring failed in the %s (training continues; counted in monitoring_errors)", site)

    # -- hook bodies --------------------------------------------------------------------

    def _wrap_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def scale(outputs: Any) -> Any:
            if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
                self._loss_parts.append(outputs.detach())
            return original(outputs)

        return scale

    def _wrap_update(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def update(*args: Any, **kwargs: Any) -> Any:
            before = self._guarded("scaler.update wrapper", self._before_scaler_update)()
            result = original(*args, **kwargs)
            self.steps += 1  # an attempt counts even when measuring it fails
            try:
                if before is not None:
                    self._guarded("scaler.update wrapper", self._after_scaler_update)(*before)
            finally:
                self._step_ran = False
            return result

        return update

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.scaler is None:
            self.steps += 1  # first, so that a failure below cannot shift later step numbers
            if self._stack is None:  # not measured already by gradients_ready()
                self._take_snapshot_if_sampled(self.steps)
                self._measure_gradients(self.steps, grad_multiplier=None, format_multiplier=None)
            if not self._is_sampled(self.steps):
                self._finish_step(skip_known=None)
            return
        upcoming = self.steps + 1  # counted when scaler.update() runs
        self._take_snapshot_if_sampled(upcoming)
        self._step_ran = True
        state = self.scaler._per_optimizer_states.get(id(optimizer))
        if self._stack is None and self.measure == "auto" and self._fused and state is not None and state["stage"] is OptState.READY:
            # The fused kernel will unscale: .grad holds g*S now, on every step.
            scale = self.scaler._get_scale_async()
            self._measure_gradients(upcoming, grad_multiplier=scale.double().reciprocal().float(), format_multiplier=None)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._stack is not None:
            self._finish_step(skip_known=None)

    def _before_scaler_update(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        assert self.scaler is not None
        scale = self.scaler._get_scale_async()
        if scale is None:
            return None  # update() before any scale(): the scaler will complain itself
        found_inf = None
        if self.optimizer is not None:
            state = self.scaler._per_optimizer_states.get(id(self.optimizer))
            if state is not None and state["found_inf_per_device"]:
                found_inf = torch.stack([f.to(scale.device) for f in state["found_inf_per_device"].values()]).sum()
        return scale.clone(), found_inf

    def _after_scaler_update(self, scale_before: torch.Tensor, found_inf: torch.Tensor | None) -> None:
        assert self.scaler is not None
        if self._stack is None:
            self._measure_gradients(self.steps, grad_multiplier=None, format_multiplier=scale_before)
        assert self._stack is not None
        self._stack.add(records.LOSS_SCALE, scale_before)
        self._stack.add(records.NEW_LOSS_SCALE, self.scaler._get_scale_async())
        if found_inf is not None:
            self._stack.add(records.FOUND_INF, found_inf)
        # A non-fused optimizer's step runs only when the scaler found no Inf/NaN.
        skip_known = None if self._fused or self.optimizer is None else not self._step_ran
        if self.measure == "manual":
            self._skip_known = skip_known  # finish_step() ends the step
        else:
            self._finish_step(skip_known=skip_known)

    # -- measuring ----------------------------------------------------------------------

    def _is_sampled(self, step: int) -> bool:
        return self.histogram_every > 0 and (step - 1) % self.histogram_every == 0

    def _forward_due(self, step: int) -> bool:
        return self.attention_every > 0 and (step - 1) % self.attention_every == 0

    def _take_snapshot_if_sampled(self, step: int) -> None:
        if self._snapshot is None and self._is_sampled(step) and self._sharding is None:
            self._snapshot = stats.snapshot(self._local_parameters())

    def _local_parameters(self) -> list[torch.Tensor]:
        """The watched parameters, or this rank's shards of the sharded ones."""
        return [local_tensor(p.detach()) for p in self._parameters]

    def _current_scaling(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(grad multiplier, format multiplier) for gradients read now: 1/S while the
        GradScaler has not unscaled them yet, else S for the format counts."""
        if self.scaler is None:
            return None, None
        scale = self.scaler._get_scale_async()
        if scale is None:
            return None, None
        state = self.scaler._per_optimizer_states.get(id(self.optimizer)) if self.optimizer is not None else None
        if state is not None and state["stage"] is not OptState.READY:
            return None, scale
        return scale.double().reciprocal().float(), None

    def _measure_gradients(self, step: int, grad_multiplier: torch.Tensor | None, format_multiplier: torch.Tensor | None) -> None:
        """Start the step's device stack with the gradient statistics."""
        self._stack = stack = DeviceStack()
        # The rates the coming update uses: read now, before a scheduler can step (manual mode).
        self._lr = [float(group["lr"]) for group in self.optimizer.param_groups] if self.optimizer is not None else []
        present = [i for i, p in enumerate(self._parameters) if p.grad is not None]
        grads = [local_tensor(self._parameters[i].grad) for i in present]
        self._present = None if len(present) == len(self._parameters) else present
        self._grads = grads
        grad_stats = stats.grad_norms(grads, multiplier=grad_multiplier) if grads else torch.zeros((2, 0), device=self.device)
        # For a fused optimizer .grad already is g*S, which is what the counts are about.
        counts = [stats.format_counts(grads, self.format, multiplier=format_multiplier)] if grads and self.format_every > 0 and (step - 1) % self.format_every == 0 else []
        if self._sharding is not None and grads:
            grad_stats, counts = self._sharding.norms(grad_stats, counts, self._present)
        self._grad_stats = grad_stats
        stack.add(records.GRAD, grad_stats)
        if not grads:
            return
        if counts:
            stack.add(records.FORMAT, counts[0])
        if self._is_sampled(step):
            unscaled = torch._foreach_mul(grads, grad_multiplier) if grad_multiplier is not None else grads
            self._add_histograms(stack, "grad", unscaled)

    def _add_histograms(self, stack: DeviceStack, kind: str, tensors: list[torch.Tensor]) -> None:
        exponent = stats.exponent_histogram(tensors)
        lows, highs = stats.finite_ranges(tensors)
        if self._sharding is not None:
            positions = self._present if kind == "grad" else None
            lows, highs = self._sharding.ranges(lows, highs)
            counts = stats.linear_histogram_counts(tensors, lows, highs)
            exponent, counts = (part.t() for part in self._sharding.counts([exponent.t(), counts.t()], positions))
        else:
            counts = stats.linear_histogram_counts(tensors, lows, highs)
        stack.add(histogram_part(kind, "exponent"), exponent)
        stack.add(histogram_part(kind, "linear_min"), lows.float())
        stack.add(histogram_part(kind, "linear_max"), highs.float())
        stack.add(histogram_part(kind, "linear"), counts)

    def _add_sampled_weight_stats(self, stack: DeviceStack) -> None:
        weights = self._local_parameters()
        weight_stats = stats.weight_stats(weights)
        if self._sharding is not None:
            weight_stats, _ = self._sharding.norms(weight_stats, [], None)
        stack.add(records.WEIGHT, weight_stats)
        self._add_histograms(stack, "weight", weights)
        if self._sharding is not None:
            return  # update_ratio, stale_fraction and exp_avg_sq shares are not combined across shards
        if self._snapshot is not None and self._grads:
            present = self._present if self._present is not None else range(len(weights))
            stack.add(records.UPDATE, stats.update_stats([self._snapshot[i] for i in present], [weights[i] for i in present], self._grads))
        if self.optimizer is not None:
            # Adam family: tensors without state yet report NaN.
            states = [self.optimizer.state.get(p, {}).get("exp_avg_sq") for p in self._parameters]
            present_states = [s for s in states if isinstance(s, torch.Tensor)]
            if present_states:
                state_format = format_spec(format_name_for_dtype(present_states[0].dtype))
                stack.add(records.EXP_AVG_SQ, stats.exp_avg_sq_underflow(states, state_format))

    def _nonfinite_counts_due(self, skip_known: bool | None) -> bool:
        if self.device.type == "cpu":
            # The norms are ordinary host memory: reading them costs nothing.
            return not bool(torch.isfinite(self._grad_stats[0]).all())
        if skip_known is not None:
            return skip_known  # the GradScaler's verdict, read on the host already
        # Reading this step's norms would synchronise, and counting every tensor every step
        # costs ~4 kernel launches per tensor (+10 ms per step for 100 tensors on an H100).
        # Count on sampled steps and while non-finite gradients were seen lately; the
        # per-tensor norms flag every non-finite tensor at every step regardless.
        return self._is_sampled(self.steps) or self._nonfinite_seen_at >= self.steps - NONFINITE_RECOUNT_STEPS

    def _finish_step(self, skip_known: bool | None) -> None:
        """Complete the step's stack, start its host copy and hand it on."""
        stack, self._stack = self._stack, None
        assert stack is not None
        step = self.steps
        if self._grads and self._nonfinite_counts_due(skip_known):
            nonfinite = stats.nonfinite_counts(self._grads)
            if self._sharding is not None:
                (nonfinite,) = self._sharding.counts([nonfinite], self._present)
            stack.add(records.NONFINITE, nonfinite)
        if self._is_sampled(step):
            self._add_sampled_weight_stats(stack)
        self._snapshot = None
        if self._loss_parts:
            # The loss whose gradient was measured: the sum of what went through
            # scaler.scale() since the last step (micro-batches under accumulation).
            stack.add(records.LOSS, torch.stack([loss.float().to(self.device) for loss in self._loss_parts]).sum())
        self._loss_parts = []
        host_scalars, logged_loss = self._take_logged(stack)
        module_order: list[int] = []
        if self.tracer is not None:
            absmax, module_order = self.tracer.take_step(self.device)
            stack.add(records.ACTIVATION_ABSMAX, absmax)
        attention_calls: list[str] = []
        if self.probe is not None:
            attention, output_logits = self.probe.take_step()
            if attention:
                attention_calls = list(attention)
                stack.add(records.ATTENTION_LOGIT_MAX, torch.stack([value.to(self.device) for value in attention.values()]))
            if output_logits is not None:
                stack.add(records.OUTPUT_LOGITS, output_logits.to(self.device))
        now = time.perf_counter()
        record = StepRecord(
            step_number=step,
            time=time.time(),
            step_time=now - self._last_step_clock if self._last_step_clock is not None else None,
            host=stack.to_host(),
            n_tensors=len(self._parameters),
            present=self._present,
            lr=self._lr,
            scalars=host_scalars,
            format_max=self.format.max,
            loss=logged_loss,
            module_order=module_order,
            attention_calls=attention_calls,
        )
        self._last_step_clock = now
        self._grads = []
        previous, self._pending = self._pending, record
        if previous is not None:
            self._hand_on(previous)
        if self.device.type == "cpu":
            self._hand_on_pending()

    def _take_logged(self, stack: DeviceStack) -> tuple[dict[str, float], float | None]:
        host_scalars: dict[str, float] = {}
        logged_loss = None
        for name, value in self._logged.items():
            if isinstance(value, torch.Tensor):
                stack.add(records.LOSS if name == "loss" else records.SCALAR_PREFIX + name, value.detach().reshape(()).to(self.device))
            elif name == "loss":
                logged_loss = float(value)
            else:
                host_scalars[name] = float(value)
        self._logged = {}
        return host_scalars, logged_loss

    def _hand_on_pending(self) -> None:
        record, self._pending = self._pending, None
        if record is not None:
            self._hand_on(record)

    def _hand_on(self, record: StepRecord) -> None:
        """Check a measured step for non-finite values (may raise), then queue it."""
        try:
            self._check_nonfinite(record)
        finally:
            self.transport.submit(record)

    # -- non-finite values ------------------------------------------------------------------

    def _check_nonfinite(self, record: StepRecord) -> None:
        grad_norm = record.grad_rows()[0]
        bad = [int(i) for i in record.present_indices()[~np.isfinite(grad_norm)]]
        loss = record.loss_value()
        loss_bad = loss is not None and not math.isfinite(loss)
        if not bad and not loss_bad:
            return
        self._nonfinite_seen_at = max(self._nonfinite_seen_at, record.step_number)
        counts = self._nonfinite_counts_by_tensor(record, bad)
        offenders = [{"name": self.tensor_names[i], "nan": nan, "inf": inf} for i, (nan, inf) in list(counts.items())[:NAMED_TENSORS]]
        module = None
        if self.tracer is not None and records.ACTIVATION_ABSMAX in record.host:
            module = self.tracer.first_nonfinite_module(record.host.get(records.ACTIVATION_ABSMAX), record.module_order)
        if not self._nonfinite_reported:
            self._nonfinite_reported = True
            details = {"tensors": offenders, "nonfinite_tensors": len(bad), "loss": protocol.encode_float(loss), "module": module}
            record.events.append(protocol.event_document(record.step_number, "nonfinite_origin", details))
        described = ", ".join(f"{o['name']} (nan={o['nan']}, inf={o['inf']})" for o in offenders) or "all finite"
        more = f" and {len(bad) - len(offenders)} more" if len(bad) > len(offenders) else ""
        origin = f"; first non-finite module output: {module}" if module else ""
        message = f"numwatch: non-finite values at step {record.step_number} of run {self.run!r}: loss={loss}; gradients: {described}{more}{origin}"
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        if self.on_nonfinite == "warn":
            self._warnings.warn(("nonfinite", tuple(bad), loss_bad), message)

    def _nonfinite_counts_by_tensor(self, record: StepRecord, bad: list[int]) -> dict[int, tuple[int | None, int | None]]:
        counts = record.nonfinite_rows()
        if counts is None:
            return {i: (None, None) for i in bad}
        position = {int(i): column for column, i in enumerate(record.present_indices())}
        return {i: (int(counts[0, position[i]]), int(counts[1, position[i]])) for i in bad}

    # -- public API ---------------------------------------------------------------------

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach scalars (``loss=...``, custom values) to the current step. Tensors stay on
        the device and travel with the step's single host copy."""
        self._logged.update(scalars)

    @property
    def step_in_progress(self) -> bool:
        """Whether a step has been measured and not yet ended."""
        return self._stack is not None

    def gradients_ready(self) -> None:
        """Measure the gradients of the coming optimizer step now.

        For adapters whose framework changes the gradients between the backward and
        ``optimizer.step()`` (clipping): called before clipping, the numbers are what
        ``clip_grad_norm_`` sees. Gradients the GradScaler has not unscaled yet are measured
        times 1/S. The step still ends where it would (optimizer step, ``scaler.update()``)
        or, with ``measure="manual"``, at :meth:`finish_step`.
        """
        if self._closed:
            return
        try:
            upcoming = self.steps + 1
            self._take_snapshot_if_sampled(upcoming)
            grad_multiplier, format_multiplier = self._current_scaling()
            self._measure_gradients(upcoming, grad_multiplier=grad_multiplier, format_multiplier=format_multiplier)
        except NonFiniteError:
            raise
        except Exception:
            self._count_failure("watcher.gradients_ready")

    def finish_step(self) -> None:
        """End a step measured by :meth:`gradients_ready` (``measure="manual"``), after the
        optimizer update (and ``scaler.update()``). Does nothing when no step was measured."""
        if self._closed or self.measure != "manual" or self._stack is None:
            return
        if self.scaler is None:
            self.steps += 1
        skip_known, self._skip_known = self._skip_known, None
        try:
            self._finish_step(skip_known=skip_known)
        except NonFiniteError:
            raise
        except Exception:
            self._count_failure("watcher.finish_step")
        finally:
            self._step_ran = False

    def step(self) -> None:
        """Mark a step by hand (loops without an optimizer object): measure the gradients now."""
        if self._closed:
            return
        self.steps += 1
        try:
            self._measure_gradients(self.steps, grad_multiplier=None, format_multiplier=None)
            self._finish_step(skip_known=None)
        except NonFiniteError:
            raise
        except Exception:
            self._count_failure("watcher.step")

    @property
    def dropped_steps(self) -> int:
        """Steps that could be neither queued nor spooled."""
        return self.transport.dropped_steps

    def flush(self) -> None:
        """Send (or spool) everything measured so far and wait for it."""
        self._hand_on_pending()
        self.transport.flush()

    def close(self, status: str = "finished") -> None:
        """Remove every hook and patch, send the final batch (``status``) and stop the sender."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in self._patched:
            delattr(self.scaler, name)
        self._patched.clear()
        if self.tracer is not None:
            self.tracer.remove()
        if self.probe is not None:
            self.probe.remove()
        _watched_models.pop(self.model, None)
        atexit.unregister(self._close_at_exit)
        try:
            self._hand_on_pending()
        except NonFiniteError:
            pass  # closing is not the place to stop training
        finally:
            self._warnings.report_repeats()
            self.transport.close(status)
        if self.dropped_steps:
            log.warning("numwatch: run %r dropped %d steps of monitoring data", self.run, self.dropped_steps)

    def _close_at_exit(self) -> None:
        self.close("finished")

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close("crashed" if exc_type is not None else "finished")


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    run: str | None = None,
    url: str | None = None,
    token: str | None = None,
    project: str | None = None,
    histogram_every: int = 100,
    format_every: int = 50,
    attention_every: int | None = None,
    logits_module: str | None = None,
    format: str | None = None,
    on_nonfinite: str = "warn",
    measure: str = "auto",
    trace_activations: bool = False,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
) -> Watcher:
    """Watch ``model``'s gradients (and ``optimizer``, ``scaler``) at every optimizer step.

    ``optimizer`` may be a framework's wrapper (Accelerate, Lightning): the torch optimizer
    inside is watched, with the wrapper's GradScaler unless ``scaler`` is given.

    ``url``/``token`` default to ``NUMWATCH_URL``/``NUMWATCH_TOKEN``; without a URL the
    documents go to the spool (``spool_dir``, else ``NUMWATCH_SPOOL_DIR``, else the user's
    data directory) for ``numwatch sync``. ``include``/``exclude`` are fnmatch patterns on
    parameter names. ``histogram_every``/``format_every`` set the cadence of the sampled
    statistics and of the format counts (0 turns them off). ``attention_every`` (default
    ``histogram_every``; 0 off) sets which steps' forwards are measured: the max attention logit
    of every ``scaled_dot_product_attention`` call and the output logits' log Z, read from the
    model's output (a tensor, a tuple's first element, ``.logits``) or from the output of the
    submodule named ``logits_module``. ``format`` is the target format
    of the counts (default fp16 with a GradScaler, else the parameters' dtype).
    ``on_nonfinite``: "warn", "raise" (:class:`NonFiniteError`) or "ignore".
    ``measure``: "auto" (at the optimizer step or ``scaler.update()``; a
    :meth:`Watcher.gradients_ready` call measures earlier) or "manual" (only
    ``gradients_ready()`` measures; :meth:`Watcher.finish_step` ends each step).
    Raises :class:`~numwatch.sharded.UnsupportedConfiguration` for setups it cannot measure
    correctly (DeepSpeed, FSDP1 flat parameters, some DTensor placements).
    """
    optimizer, scaler = unwrap_optimizer(optimizer, scaler)
    return Watcher(
        model,
        optimizer,
        scaler=scaler,
        run=run,
        url=url,
        token=token,
        project=project,
        histogram_every=histogram_every,
        format_every=format_every,
        attention_every=attention_every,
        logits_module=logits_module,
        format=format,
        on_nonfinite=on_nonfinite,
        measure=measure,
        trace_activations=trace_activations,
        include=include,
        exclude=exclude,
        spool_dir=spool_dir,
        config=config,
    )
