"""``numwatch.watch``: measure a training run's numeric health at every optimizer step.

Where the numbers are taken:

* The gradients are read at the end of each backward through the watched model (a forward
  hook marks the model's outputs; the read runs on the autograd engine after DDP's and
  FSDP's reductions), so they are the backward's gradients before any clipping, by any
  means (``clip_grad_norm_``, ``clip_grad_value_``, ``clip_grads_with_norm_``, by hand).
  Gradients still scaled by a GradScaler are measured times 1/S. Under gradient
  accumulation every micro-batch's backward reads and the last reading, of the summed
  gradients, is the step's. A loop whose model is not called as ``model(...)`` has no such
  read; the step site reads instead (then after clipping).
* Where a step is counted and ended is the step site's (:mod:`numwatch.step.sites`): at
  ``scaler.update()`` with an enabled GradScaler, at the optimizer step without one, at
  ``watcher.step()`` without an optimizer, at ``finish_step()`` for framework adapters.
* Loss: with an enabled GradScaler, what went through ``scaler.scale()``; otherwise the
  scalar root of each backward that reached the model. Under accumulation, the sum over the
  step's backwards. ``watcher.log(loss=...)`` takes precedence.
* ``watcher.log(...)``: values logged after a step ended and before the model's next
  forward (with gradients) belong to the step that ended; from that forward on, to the next.
* Sharded (DTensor, FSDP2) parameters: each rank measures its shard and
  :mod:`numwatch.kernels.sharded` combines them into whole-tensor statistics.
* DeepSpeed ZeRO: the engine's optimizer step reads, counts and ends each step
  (:mod:`numwatch.step.deepspeed_site`), from each rank's partition (:mod:`numwatch.capture.deepspeed`).

NaN/Inf counts are taken when that costs no host-device sync (:mod:`numwatch.step.reading`).
On devices other than the CPU the host copy of a step is read at the next step, so
``on_nonfinite`` acts one step late there.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from numwatch import protocol, settings
from numwatch.capture.activations import ActivationTracer
from numwatch.capture.backward_end import BackwardEndTrigger
from numwatch.capture.backward_roots import RootListener
from numwatch.capture.clipping import ClipObserver
from numwatch.capture.deepspeed import EngineAdapter, ZeroPartition, deepspeed_engine
from numwatch.capture.forward_probe import ForwardProbe
from numwatch.capture.gemm import ROWS as GEMM_ROWS
from numwatch.capture.gemm import GemmProbe
from numwatch.capture.guard import Guard
from numwatch.capture.local_grads import (
    FsdpLocalProbe,
    LocalGradProbe,
    LocalProbe,
    ZeroLocalProbe,
    is_ddp,
    is_fsdp2,
)
from numwatch.capture.scaler import ScalerAdapter
from numwatch.delivery.nonfinite import NonFiniteCheck, NonFiniteError
from numwatch.delivery.spool import default_spool_root, spool_directory
from numwatch.delivery.transport import Transport
from numwatch.formats import format_name_for_dtype, format_spec
from numwatch.kernels.chunks import release_scratch
from numwatch.kernels.device import accelerator_path
from numwatch.kernels.sharded import UnsupportedConfiguration, refuse_unsupported
from numwatch.step import records
from numwatch.step.deepspeed_site import DeepSpeedSite
from numwatch.step.ledger import Stage, StepLedger
from numwatch.step.measurement import Cadence, WatchedTensors, select_parameters
from numwatch.step.reading import GradientReader, learning_rates
from numwatch.step.records import StepRecord
from numwatch.step.replication import ReplicaTensors, replica_lead, shard_group_lead
from numwatch.step.sites import FrameworkSite, FusedScalerSite, OptimizerHookSite, ScalerSite, StepCallSite, StepSite

__all__ = ["NonFiniteError", "Watcher", "watch"]

log = logging.getLogger("numwatch")

MEASURE_MODES = ("auto", "manual")

_watched_models: weakref.WeakKeyDictionary[nn.Module, Watcher] = weakref.WeakKeyDictionary()


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _run_identity(model: nn.Module, run: str | None, world_size: int) -> tuple[str, str]:
    """(run name, instance): the name given, else ``NUMWATCH_RUN``, else model class and start
    time; the instance identifies this watching process. Rank 0's pair on every rank: the
    ranks of one job are one run, a second job is another instance."""
    name = (
        run or settings.read(settings.RUN) or f"{type(model).__name__}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    identity = [name, uuid.uuid4().hex]
    if world_size > 1:
        torch.distributed.broadcast_object_list(identity, src=0)
    return identity[0], identity[1]


def unwrap_optimizer(
    optimizer: Any, scaler: torch.amp.GradScaler | None
) -> tuple[torch.optim.Optimizer | None, torch.amp.GradScaler | None]:
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
    """Watches one model (and optimizer, scaler); create it with :func:`watch`.

    Wiring only: the step ledger (:mod:`numwatch.step.ledger`) owns the steps, the step sites
    (:mod:`numwatch.step.sites`) count and end them, the capture hooks feed them, and the
    transport sends them.
    """

    run: str
    instance: str
    _ledger: StepLedger

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
        quant_every: int,
        gemm_every: int | None,
        gemm_rows: int,
        format: str | None,
        on_nonfinite: str,
        measure: str,
        trace_activations: bool,
        include: Iterable[str] | None,
        exclude: Iterable[str] | None,
        spool_dir: str | os.PathLike[str] | None,
        config: dict[str, Any] | None,
        resume: bool,
        deepspeed: Any = None,
    ) -> None:
        if measure not in MEASURE_MODES:
            raise ValueError(f"measure must be one of {MEASURE_MODES}, not {measure!r}")
        if gemm_rows < 0:
            raise ValueError(f"gemm_rows must be >= 0 (0 quantizes every row), not {gemm_rows}")
        # DeepSpeed: the engine (checked by deepspeed_engine) whose optimizer step reads and ends each step.
        self._deepspeed = EngineAdapter(deepspeed) if deepspeed is not None else None
        if deepspeed is None:
            refuse_unsupported(model, optimizer)
        if model in _watched_models:
            raise RuntimeError(
                f"this {type(model).__name__} is already watched (run {_watched_models[model].run!r}); "
                "close() that watcher first"
            )
        self.model = model
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.histogram_every = histogram_every
        self.format_every = format_every
        self.attention_every = histogram_every if attention_every is None else attention_every
        if self.attention_every < 0:
            raise ValueError(f"attention_every must be >= 0 (0 turns it off), not {self.attention_every}")
        self.measure = measure
        selected = select_parameters(model, include, exclude)
        if not selected:
            raise ValueError("no trainable parameter matches include/exclude: nothing to watch")
        fmt = format_spec(format or ("fp16" if self.scaler else format_name_for_dtype(selected[0][1].dtype)))
        partition = ZeroPartition(deepspeed, [p for _, p in selected]) if deepspeed is not None else None
        # ranks: what is the same on every rank of a data-parallel group is measured (DDP) or sent (FSDP2) once
        lead = replica_lead(model)
        tensors = ReplicaTensors if lead is not None else WatchedTensors
        self.watched = tensors(selected, fmt, Cadence(histogram_every, format_every, quant_every), partition)
        self.tensor_names = self.watched.names
        self.device = self.watched.device
        self.format = fmt
        self.rank, self.world_size = _distributed_rank()
        self.run, self.instance = _run_identity(model, run, self.world_size)
        self.resume = resume
        self._closed = False

        # A failure anywhere drops the step under way whole (the ledger is made below, before any hook runs).
        self._guard = Guard(lambda: self._ledger.fail(), passthrough=(NonFiniteError,))
        self._scaler = ScalerAdapter(self.scaler) if self.scaler is not None else None
        self.tracer = ActivationTracer(model) if trace_activations else None
        self.probe = (
            ForwardProbe(model, self._forward_due, self._guard.failed, logits_module)
            if self.attention_every > 0
            else None
        )
        self.gemm_every = self._gemm_cadence(gemm_every)
        self.gemm_rows = gemm_rows
        self.gemm = (
            GemmProbe(model, self.watched.parameters, self._gemm_due, self._guard.failed, gemm_rows)
            if self.gemm_every > 0
            else None
        )
        self._checker = NonFiniteCheck(self.run, self.tensor_names, on_nonfinite, self.tracer)
        # ranks: each rank's gradient before the reduction (numwatch.capture.local_grads)
        self._local = self._local_probe(model)
        self._reader = GradientReader(self.watched, self._scaler, self._checker, optimizer)
        self._ledger = StepLedger(
            self._reader,
            self._checker,
            self._submit,
            defer_checks=accelerator_path(self.device),
            tracer=self.tracer,
            probe=self.probe,
            gemm=self.gemm,
            local=self._local,
            replicated_by=lead if lead is not None else shard_group_lead(self.watched),
        )

        self._sites: list[StepSite] = self._make_sites(optimizer)
        self._step_site: StepCallSite | None = None  # made by the first watcher.step()
        self._trigger: BackwardEndTrigger | None = None
        self._root_listener: RootListener | None = None
        self._optimizer_finder: RemovableHandle | None = None
        self._clips = ClipObserver(self.watched.parameters, self._ledger, self._guard)
        if measure == "auto" and self._deepspeed is None:
            self._trigger = BackwardEndTrigger(
                model,
                self._guard("end-of-backward read", self._backward_ended),
                on_forward=self._guard("forward hook", self._ledger.seal_ended),
            )
            self._root_listener = RootListener(self._guard)
            if optimizer is None:
                self._optimizer_finder = register_optimizer_step_pre_hook(
                    self._guard("optimizer finder", self._find_optimizer)
                )

        self._project, self._config = project, config
        self._url = url if url is not None else settings.read(settings.URL)
        self._token = token if token is not None else settings.read(settings.TOKEN)
        root = spool_dir if spool_dir is not None else default_spool_root()
        self.spool_dir = spool_directory(root, self.run, self.rank, self.instance)
        self._transport: Transport | None = None
        if optimizer is not None or measure == "manual":
            self._start_transport()  # else when the optimizer is found (its param groups go in the run document)
        _watched_models[model] = self
        atexit.register(self._close_at_exit)

    # -- setup ------------------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The watched optimizer (None until a framework that builds it late steps it)."""
        return self._reader.optimizer

    def _local_probe(self, model: nn.Module) -> LocalProbe | None:
        """The probe of this rank's own gradient, where the job has several ranks and it can be seen."""
        if self.world_size == 1:
            return None
        sampled = lambda: self.watched.cadence.sampled(self._ledger.steps + 1)  # noqa: E731
        if self._deepspeed is not None:
            engine = self._deepspeed.engine
            stage = engine.zero_optimization_stage()
            accumulated = self._deepspeed if self._deepspeed.accumulation_steps() > 1 else None
            if accumulated is not None and stage > 1:
                return None  # ZeRO-2/3: the rank's own sum over the micro-batches never exists (see local_grads)
            return ZeroLocalProbe(
                engine.module,
                self._deepspeed.loss_scale,
                sampled,
                self._guard,
                replicated=stage < 3,  # stages 1, 2: every rank holds every weight
                accumulated=accumulated,
            )
        if is_fsdp2(model):
            return FsdpLocalProbe(model, sampled, self._guard)
        return LocalGradProbe(model, sampled, self._guard) if is_ddp(model) else None

    def _make_sites(self, optimizer: torch.optim.Optimizer | None) -> list[StepSite]:
        ledger, guard = self._ledger, self._guard
        if self._deepspeed is not None:
            return [DeepSpeedSite(ledger, guard, self._deepspeed)]
        if self.measure == "manual":
            framework: list[StepSite] = [FrameworkSite(ledger, guard, optimizer)]
            return framework + (
                [ScalerSite(ledger, guard, optimizer, self._scaler, ends_steps=False)]
                if self._scaler is not None
                else []
            )
        if self._scaler is not None:
            fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
            return [(FusedScalerSite if fused else ScalerSite)(ledger, guard, optimizer, self._scaler)]
        return [OptimizerHookSite(ledger, guard, optimizer)]

    def _find_optimizer(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Frameworks that build the optimizer late: the first optimizer stepped that holds
        watched parameters becomes the watched one, from this very step on."""
        if self.optimizer is not None or self._step_site is not None or self._closed:
            return
        watched = {id(p) for p in self.watched.parameters}
        if not any(id(p) in watched for group in optimizer.param_groups for p in group["params"]):
            return
        refuse_unsupported(self.model, optimizer)
        self._reader.optimizer = optimizer
        for site in self._sites:
            site.remove()
        self._sites = self._make_sites(optimizer)
        self._start_transport()
        # Hooks added while torch runs this step's hooks may or may not run now; the sites'
        # step hooks are idempotent within a step, so calling them here counts the step once.
        for site in self._sites:
            if isinstance(site, (OptimizerHookSite, ScalerSite)):
                site.before_step(optimizer, args, kwargs)

    def _start_transport(self) -> None:
        if self._transport is not None:
            return
        self._transport = Transport(
            self._run_document(self._project, self._config), url=self._url, token=self._token, spool_dir=self.spool_dir
        )
        if self._transport.url is None:
            try:
                self._transport.open_spool()
            except OSError:
                # Not fatal to training: every step will be counted in dropped_steps.
                log.exception("numwatch: cannot write the spool %s", self.spool_dir)

    @property
    def transport(self) -> Transport:
        """The sender of this run's documents (started once the optimizer is known)."""
        self._start_transport()
        assert self._transport is not None
        return self._transport

    def _submit(self, record: StepRecord) -> None:
        self.transport.submit(record)

    def _run_document(self, project: str | None, config: dict[str, Any] | None) -> protocol.RunDocument:
        groups = {}
        if self.watched.partition is not None:
            groups = self.watched.partition.param_groups()  # ZeRO's groups hold flat partitions
        elif self.optimizer is not None:
            for index, group in enumerate(self.optimizer.param_groups):
                groups.update({id(p): index for p in group["params"]})
        tensors: list[protocol.TensorSpec] = [
            {
                "name": n,
                "shape": list(shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "group": groups.get(id(p), protocol.NO_PARAM_GROUP),
            }
            for n, p, shape in zip(self.watched.names, self.watched.parameters, self.watched.shapes, strict=True)
        ]
        run_config = {
            "model": type(self.model).__name__,
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "grad_scaler": self.scaler is not None,
            "fused_optimizer": bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)),
            "sharded": self.watched.sharding is not None,
            "histogram_every": self.histogram_every,
            "format_every": self.format_every,
            "attention_every": self.attention_every,
            "quant_every": self.watched.cadence.quant_every,
            "gemm_every": self.gemm_every,
            "gemm_rows": self.gemm_rows,
            "torch": torch.__version__,
            "user": _json_safe(config),
        }
        return protocol.run_document(
            self.run,
            rank=self.rank,
            world_size=self.world_size,
            format=self.format.name,
            tensors=tensors,
            project=project or settings.read(settings.PROJECT) or "default",
            modules=self.tracer.module_names if self.tracer else [],
            config=run_config,
            instance=self.instance,
            resume=self.resume,
        )

    # -- hooks ------------------------------------------------------------------------------

    def _forward_due(self) -> bool:
        # A forward belongs to the step that has not been counted yet.
        return self._ledger.steps % self.attention_every == 0

    def _gemm_due(self) -> bool:
        return self._ledger.steps % self.gemm_every == 0

    def _gemm_cadence(self, gemm_every: int | None) -> int:
        """``gemm_every`` as given, else ``histogram_every``. Sharded parameters (FSDP2, DTensor, DeepSpeed
        ZeRO) reach ``F.linear`` as gathered copies, or are released again before the forward ends: off by
        default, refused when asked."""
        if gemm_every is not None and gemm_every < 0:
            raise ValueError(f"gemm_every must be >= 0 (0 turns it off), not {gemm_every}")
        if self.watched.sharding is None and self.watched.partition is None:
            return self.histogram_every if gemm_every is None else gemm_every
        if gemm_every:
            raise UnsupportedConfiguration(
                "numwatch: gemm_every needs unsharded parameters (FSDP2, DTensor and DeepSpeed ZeRO weights reach "
                "F.linear as gathered copies); pass gemm_every=0"
            )
        return 0

    def _backward_ended(self) -> None:
        measurement = self._ledger.read_gradients()
        roots = self._root_listener.take() if self._root_listener is not None else ()
        if self._scaler is None:
            measurement.add_losses(roots)  # with a scaler, scaler.scale() saw the unscaled loss

    # -- public API ---------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Optimizer-step attempts counted by the step site (skipped ones included)."""
        return self._ledger.steps

    @property
    def monitoring_errors(self) -> int:
        """Failures of the monitoring itself, each caught before it reached training."""
        return self._guard.errors

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach scalars (``loss=...``, custom values) to a step: the step that ended, until
        the model's next forward; else the step under way. Tensors stay on the device and
        travel with the step's host copy."""
        self._ledger.log(scalars)

    @property
    def step_in_progress(self) -> bool:
        """Whether a step has been measured and not yet ended."""
        measurement = self._ledger.under_way
        return measurement is not None and measurement.started

    def takes_logs_for(self, step: int) -> bool:
        """Whether step ``step`` ended and still takes ``log()`` values (until the model's next forward)."""
        return self._ledger.stage_of(step) is Stage.ENDED

    def gradients_ready(self) -> None:
        """Read the gradients of the coming optimizer step now (replacing an earlier read).

        For adapters whose framework changes the gradients between the backward and
        ``optimizer.step()`` (clipping): called before clipping, the numbers are what
        ``clip_grad_norm_`` sees. Gradients the GradScaler has not unscaled yet are measured
        times 1/S. The step still ends where it would (optimizer step, ``scaler.update()``)
        or, with ``measure="manual"``, at :meth:`finish_step`.
        """
        if not self._closed and self._deepspeed is None:  # DeepSpeed's optimizer step reads them
            self._guard("watcher.gradients_ready", self._read_now)()

    def _read_now(self) -> None:
        measurement = self._ledger.read_gradients()
        measurement.lr = learning_rates(self.optimizer)

    def finish_step(self) -> None:
        """End a step measured by :meth:`gradients_ready` (``measure="manual"``), after the
        optimizer update (and ``scaler.update()``). Does nothing when no step was measured."""
        if self._closed or self.measure != "manual" or self._deepspeed is not None:
            return
        (framework,) = [site for site in self._sites if isinstance(site, FrameworkSite)]
        self._guard("watcher.finish_step", framework.finish_step)()

    def step(self) -> None:
        """Mark a step by hand (loops without an optimizer object)."""
        if self._closed:
            return
        if self.optimizer is not None:
            raise RuntimeError(
                "numwatch: this watcher counts the steps of its optimizer; watcher.step() is for loops without one"
            )
        if self._step_site is None:
            self._step_site = StepCallSite(self._ledger, self._guard, None)
        self._guard("watcher.step", self._step_site.step)()

    @property
    def dropped_steps(self) -> int:
        """Steps that could be neither queued nor spooled."""
        return self.transport.dropped_steps

    def flush(self) -> None:
        """Send (or spool) everything measured so far and wait for it."""
        self._ledger.settle()
        self.transport.flush()

    def close(self, status: protocol.RunStatus = "finished") -> None:
        """Remove every hook and patch, send the final batch (``status``) and stop the sender."""
        if self._closed:
            return
        self._closed = True
        for site in self._sites:
            site.remove()
        hooks = (
            self._trigger,
            self._root_listener,
            self._optimizer_finder,
            self._clips,
            self.tracer,
            self.probe,
            self.gemm,
            self._local,
        )
        for hook in hooks:
            if hook is not None:
                hook.remove()
        _watched_models.pop(self.model, None)
        if not _watched_models:
            release_scratch()  # the statistics' CPU scratch buffers: no watcher needs them now
        atexit.unregister(self._close_at_exit)
        try:
            self._guard("close: final quantization", self._measure_final_weights)()
            self._ledger.close()
        except NonFiniteError:
            pass  # closing is not the place to stop training
        finally:
            self._checker.warnings.report_repeats()
            self.transport.close(status)
        if self.dropped_steps:
            log.warning("numwatch: run %r dropped %d steps of monitoring data", self.run, self.dropped_steps)

    def _measure_final_weights(self) -> None:
        """The last step takes the final weights' quantization SQNR, unless it has it (see
        :meth:`StepLedger.add_final_parts <numwatch.step.ledger.StepLedger.add_final_parts>`)."""
        record = self._ledger.last_record
        if record is None or self.watched.cadence.quant_every <= 0 or record.has_part(records.QUANT):
            return
        parts = self.watched.quant_parts()
        if parts:
            self._ledger.add_final_parts(parts)

    def _close_at_exit(self) -> None:
        self.close("finished")

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: Any) -> None:
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
    quant_every: int = 1000,
    gemm_every: int | None = None,
    gemm_rows: int = GEMM_ROWS,
    format: str | None = None,
    on_nonfinite: str = "warn",
    measure: str = "auto",
    trace_activations: bool = False,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    config: dict[str, Any] | None = None,
    resume: bool = False,
) -> Watcher:
    """Watch ``model``'s gradients (and ``optimizer``, ``scaler``) at every optimizer step.

    ``optimizer`` may be a framework's wrapper (Accelerate, Lightning): the torch optimizer
    inside is watched, with the wrapper's GradScaler unless ``scaler`` is given. Without one
    (frameworks that build it later), the first optimizer stepped that holds watched
    parameters is watched from that step on; ``watcher.step()`` is for loops without any.

    ``run`` names the run; every process (every job: the ranks of one share rank 0's) is a
    run of its own. A name another process already used is stored as ``<run>-2`` (``-3``...,
    with a warning) unless ``resume=True``, which adds this process's steps to that run,
    numbered after its last stored step.

    ``url``/``token`` default to ``NUMWATCH_URL``/``NUMWATCH_TOKEN``; without a URL the
    documents go to the spool (``spool_dir``, else ``NUMWATCH_SPOOL_DIR``, else the user's
    data directory) for ``numwatch sync``. ``include``/``exclude`` are fnmatch patterns on
    parameter names. ``histogram_every``/``format_every`` set the cadence of the sampled
    statistics and of the format counts (0 turns them off); ``quant_every`` that of the
    weights' quantization SQNR, which ``close()`` also measures on the last step (0 turns it
    off). ``attention_every`` (default ``histogram_every``; 0 off) sets which steps' forwards
    are measured: the max attention logit of every ``scaled_dot_product_attention`` call and the
    output logits' log Z, read from the model's output (a tensor, a tuple's first element,
    ``.logits``) or from the output of the submodule named ``logits_module``. ``gemm_every`` (default
    ``histogram_every``; 0 off) sets the steps whose ``F.linear`` calls are measured: what fp8, MXFP8 and
    NVFP4 would do to each watched Linear weight's matmul operands X, W and dY (:mod:`numwatch.capture.gemm`;
    refused with sharded parameters); of an operand with more rows (tokens of X and dY, output features of
    W), ``gemm_rows`` evenly spaced rows are quantized under the whole operand's scales, so those numbers
    are estimates (0: every row, exact). ``format`` is the target format
    of the counts (default fp16 with a GradScaler, else the parameters' dtype).
    ``on_nonfinite``: "warn", "raise" (:class:`NonFiniteError`) or "ignore".
    ``measure``: "auto" (gradients read at the end of each backward through ``model``, so
    before clipping; a :meth:`Watcher.gradients_ready` call reads again) or "manual" (for
    framework adapters: only ``gradients_ready()`` reads; :meth:`Watcher.finish_step` ends
    each step).
    ``model`` may be a DeepSpeed engine (ZeRO stages 1, 2, 3): ``watch(engine)`` and
    ``watch(engine.module, engine.optimizer)`` are the same; see ``docs/frameworks-deepspeed.md``.
    Raises :class:`~numwatch.kernels.sharded.UnsupportedConfiguration` for setups it cannot measure
    correctly (DeepSpeed offload and other parallelisms, FSDP1 flat parameters, some DTensor placements).
    """
    engine = deepspeed_engine(model, optimizer)  # refuses the DeepSpeed setups it cannot measure
    if engine is not None:
        model, optimizer = engine.module, engine.optimizer
    else:
        refuse_unsupported(model, optimizer)  # before unwrapping: a wrapper may hide what it wraps
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
        quant_every=quant_every,
        gemm_every=gemm_every,
        gemm_rows=gemm_rows,
        format=format,
        on_nonfinite=on_nonfinite,
        measure=measure,
        trace_activations=trace_activations,
        include=include,
        exclude=exclude,
        spool_dir=spool_dir,
        config=config,
        resume=resume,
        deepspeed=engine,
    )
