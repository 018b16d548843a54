"""What is measured at a step: the watched tensors' statistics and one object per step holding them.

:class:`WatchedTensors` knows the watched parameters and takes their statistics (it calls
:mod:`numwatch.kernels.stats`; sharded parameters are combined by :mod:`numwatch.kernels.sharded`).

:class:`StepMeasurement` is everything measured for one optimizer step, from its first
backward to its end, in an explicit state:

* OPEN: created (by the step's first backward, a ``watcher.log`` call or the step site);
  nothing read yet.
* READ: the gradients were read (:class:`GradientReading`). A later backward of the same
  step (gradient accumulation) replaces the reading whole: the last one is the step's.
* FAILED: monitoring failed somewhere in this step. Every tensor reference is dropped and
  whatever arrives until the step ends is ignored, so the failure cannot leak into the
  next step (a loss summed over two steps, stale gradients kept alive).

The step site ends a READ measurement into a :class:`~numwatch.step.records.StepRecord`
(:meth:`StepMeasurement.finish`) and starts the next step with a fresh object.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import math
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from numwatch.capture.attention import AttentionMaxima
from numwatch.capture.clipping import ClipEffect
from numwatch.capture.deepspeed import ZeroPartition
from numwatch.formats import FormatSpec, format_name_for_dtype, format_spec
from numwatch.kernels import stats
from numwatch.kernels.chunks import Layout, layout_of
from numwatch.kernels.device import accelerator_path, to_device
from numwatch.kernels.optim_health import adam_family, adam_health, adam_sums, health_from_sums
from numwatch.kernels.quantization import quantization_sqnr
from numwatch.kernels.sharded import ShardReduction, is_dtensor, local_tensor
from numwatch.naming import tensor_name
from numwatch.step import records
from numwatch.step.hostcopy import DeviceStack
from numwatch.step.records import StepRecord, histogram_part


def select_parameters(
    model: nn.Module, include: Iterable[str] | str | None, exclude: Iterable[str] | str | None
) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters whose (compile-independent) names match include and not exclude."""
    include = [include] if isinstance(include, str) else list(include) if include is not None else None
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    chosen = []
    for raw_name, parameter in model.named_parameters():
        name = tensor_name(raw_name)
        if not parameter.requires_grad:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        chosen.append((name, parameter))
    return chosen


@dataclass(frozen=True)
class Cadence:
    """Which steps (numbered from 1) carry the sampled statistics and the format counts (the
    first step and every N-th after it), and the quantization SQNR (every N-th step: it is
    about trained weights, and close() measures the last step)."""

    histogram_every: int
    format_every: int
    quant_every: int = 0

    def sampled(self, step: int) -> bool:
        return self.histogram_every > 0 and (step - 1) % self.histogram_every == 0

    def quant_due(self, step: int) -> bool:
        return self.quant_every > 0 and step % self.quant_every == 0

    def after_update(self, step: int) -> bool:
        """Whether the step measures the weights after the optimizer's update."""
        return self.sampled(step) or self.quant_due(step)

    def format_due(self, step: int) -> bool:
        return self.format_every > 0 and (step - 1) % self.format_every == 0


_GRAD = operator.attrgetter("grad")
_IS_NONE = functools.partial(operator.is_, None)


@dataclass
class GradientReading:
    """One read of the gradients: their statistics (device tensors) and the gradients themselves."""

    present: list[int] | None  # schema indices of the tensors with a gradient; None: all
    grads: list[torch.Tensor]
    norms: torch.Tensor  # float32 [2, k]: grad_norm, grad_absmax (unscaled)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # format counts, histograms, NaN/Inf counts
    finite: bool | None = None  # whether every norm is finite, once read on the host (CPU path)

    @property
    def has_counts(self) -> bool:
        return records.NONFINITE in self.parts

    def all_finite(self) -> bool:
        """Whether every norm and abs-max is finite: read from host memory once (CPU path only:
        elsewhere a sync). A NaN or Inf makes the sum so."""
        if self.finite is None:
            self.finite = math.isfinite(self.norms.numpy().sum())
        return self.finite


class WatchedTensors:
    """The watched parameters and how their statistics are taken."""

    def __init__(
        self,
        selected: list[tuple[str, nn.Parameter]],
        fmt: FormatSpec,
        cadence: Cadence,
        partition: ZeroPartition | None = None,
    ) -> None:
        self.names = [name for name, _ in selected]
        self.parameters = [parameter for _, parameter in selected]
        # DeepSpeed ZeRO: the gradients, weights and Adam state are this rank's fragments of them.
        self.partition = partition
        self.sharding = partition.reduction if partition is not None else ShardReduction.for_parameters(selected)
        self.shapes = partition.shapes if partition is not None else [tuple(p.shape) for p in self.parameters]
        self._dtensors = any(is_dtensor(p) for p in self.parameters)
        self._layouts: dict[tuple[int, ...], Layout] = {}
        self._every_position = list(range(len(self.parameters)))
        self._every_key = tuple(self._every_position)
        self.device = self.parameters[0].device
        self.format = fmt
        self.cadence = cadence

    def _grad_layout(self, present: list[int]) -> Layout:
        """The layout of these parameters' gradients, kept (torch gives a gradient its parameter's
        device, dtype and size): working it out from the gradients costs more than the statistic."""
        key = self._every_key if present is self._every_position else tuple(present)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= 16:  # gradients present that keep changing: start over
                self._layouts.clear()
            layout = self._layouts[key] = layout_of([local_tensor(self.parameters[i]) for i in present])
        return layout

    def local_parameters(self) -> list[torch.Tensor]:
        """The watched parameters, or this rank's shards of the sharded ones."""
        if self.partition is not None:
            return self.partition.weights()
        return [local_tensor(p) for p in self.parameters]  # the stats run under no_grad: no per-tensor detach

    def read_gradients(
        self, step: int, grad_multiplier: stats.Multiplier, format_multiplier: stats.Multiplier
    ) -> GradientReading:
        """The gradient statistics of the coming step ``step`` from ``.grad`` as it is now.

        ``grad_multiplier`` unscales gradients still scaled by the GradScaler (1/S);
        ``format_multiplier`` is S when they are unscaled already (the format counts are about g*S).
        """
        layout: Layout | None = None
        if self.partition is not None:
            present, grads = list(range(len(self.parameters))), self.partition.gradients()
        else:
            every = list(map(_GRAD, self.parameters))  # (each .grad read costs: once per step)
            if any(map(_IS_NONE, every)):
                present = [i for i, grad in enumerate(every) if grad is not None]
                found = [grad for grad in every if grad is not None]
            else:  # (the usual case, without a loop in Python)
                present, found = self._every_position, every
            grads = [local_tensor(grad) for grad in found] if self._dtensors else found
            layout = self._grad_layout(present)
        positions = None if len(present) == len(self.parameters) else present
        if not grads:
            return GradientReading(positions, [], torch.zeros((2, 0), device=self.device))
        norms = stats.grad_norms(grads, multiplier=grad_multiplier, layout=layout)
        sampled, exponent = self.cadence.sampled(step), None
        if sampled and self.cadence.format_due(step):
            # One read of the gradients for both the format counts and the exponent histogram.
            both = stats.format_counts_and_exponent_histogram(grads, self.format, format_multiplier, grad_multiplier)
            counts, exponent = [both[0]], both[1]
        else:
            counts = (
                [stats.format_counts(grads, self.format, multiplier=format_multiplier)]
                if self.cadence.format_due(step)
                else []
            )
        if self.sharding is not None:
            norms, counts = self.sharding.norms(norms, counts, positions)
        reading = GradientReading(positions, grads, norms)
        if counts:
            reading.parts[records.FORMAT] = counts[0]
        if sampled:
            unscaled = list(torch._foreach_mul(grads, grad_multiplier)) if grad_multiplier is not None else grads
            self._add_histograms(reading.parts, "grad", unscaled, positions, exponent)
        return reading

    def norms_now(self, reading: GradientReading, grad_multiplier: torch.Tensor | None) -> torch.Tensor:
        """float32 [k]: the L2 norms of the reading's gradients as they are now (after a clip)."""
        norms = stats.grad_norms(reading.grads, multiplier=grad_multiplier)
        if self.sharding is not None:
            norms, _ = self.sharding.norms(norms, [], reading.present)
        return norms[0]

    def count_nonfinite(self, reading: GradientReading) -> None:
        """Add per-tensor NaN and Inf counts of the reading's gradients as they are now."""
        if not reading.grads or reading.has_counts:
            return
        nonfinite = stats.nonfinite_counts(reading.grads)
        if self.sharding is not None:
            (nonfinite,) = self.sharding.counts([nonfinite], reading.present)
        reading.parts[records.NONFINITE] = nonfinite

    def _add_histograms(
        self,
        parts: dict[str, torch.Tensor],
        kind: str,
        tensors: list[torch.Tensor],
        positions: list[int] | None,
        exponent: torch.Tensor | None = None,
    ) -> None:
        exponent = stats.exponent_histogram(tensors) if exponent is None else exponent
        lows, highs = stats.finite_ranges(tensors)
        if self.sharding is not None:
            lows, highs = self.sharding.ranges(lows, highs)
            counts = stats.linear_histogram_counts(tensors, lows, highs)
            exponent, counts = (part.t() for part in self.sharding.counts([exponent.t(), counts.t()], positions))
        else:
            counts = stats.linear_histogram_counts(tensors, lows, highs)
        parts[histogram_part(kind, "exponent")] = exponent
        parts[histogram_part(kind, "linear_min")] = lows.float()
        parts[histogram_part(kind, "linear_max")] = highs.float()
        parts[histogram_part(kind, "linear")] = counts

    def weight_parts(
        self,
        reading: GradientReading | None,
        snapshot: list[torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> dict[str, torch.Tensor]:
        """Sampled weight statistics after the update: norms, histograms, update ratio, Adam state."""
        weights = self.local_parameters()
        weight_stats = stats.weight_stats(weights)
        if self.sharding is not None:
            weight_stats, _ = self.sharding.norms(weight_stats, [], None)
        parts = {records.WEIGHT: weight_stats}
        self._add_histograms(parts, "weight", weights, None)
        if self.sharding is not None:
            # update_ratio, stale_fraction and exp_avg_sq shares are not combined across shards.
            adam_optimizer, adam_parameters = (
                self.partition.adam_view() if self.partition is not None else (optimizer, self.parameters)
            )
            if adam_family(adam_optimizer):
                (sums,) = self.sharding.sums([adam_sums(adam_optimizer, adam_parameters)])
                parts[records.ADAM] = health_from_sums(sums, self._numels(sums.device))
            return parts
        if snapshot is not None and reading is not None and reading.grads:
            present = reading.present if reading.present is not None else range(len(weights))
            parts[records.UPDATE] = stats.update_stats(
                [snapshot[i] for i in present], [weights[i] for i in present], reading.grads
            )
        if optimizer is not None:
            # Adam family: tensors without state yet report NaN.
            states = [optimizer.state.get(p, {}).get("exp_avg_sq") for p in self.parameters]
            present_states = [s for s in states if isinstance(s, torch.Tensor)]
            if present_states:
                state_format = format_spec(format_name_for_dtype(present_states[0].dtype))
                parts[records.EXP_AVG_SQ] = stats.exp_avg_sq_underflow(states, state_format)
            parts[records.ADAM] = adam_health(optimizer, self.parameters, before=snapshot)
        return parts

    def _numels(self, device: torch.device) -> torch.Tensor:
        """float [n]: the whole tensors' element counts."""
        return to_device(torch.tensor([float(math.prod(shape)) for shape in self.shapes]), device)

    def quant_parts(self) -> dict[str, torch.Tensor]:
        """The weights' SQNR under each quantization scheme, as they are now (of the whole
        tensors, from the shards where sharded: see :mod:`numwatch.kernels.sharded` for what is local)."""
        if self.sharding is not None:
            return {
                records.QUANT: self.sharding.quantization_sqnr(
                    self.local_parameters(), [math.prod(shape) for shape in self.shapes]
                )
            }
        return {records.QUANT: quantization_sqnr(self.local_parameters())}


class Phase(enum.Enum):
    OPEN = "open"
    READ = "read"
    FAILED = "failed"


class StepMeasurement:
    """Everything measured for one step so far (see the module docstring for the states)."""

    def __init__(self, number: int) -> None:
        self.number = number  # the step number it will carry (attempts counted from 1)
        self.phase = Phase.OPEN
        self.reading: GradientReading | None = None
        self.snapshot: list[torch.Tensor] | None = None  # weights before the update (sampled steps)
        self.losses: list[torch.Tensor] = []  # the losses backpropagated into this step
        self.logged: dict[str, Any] = {}  # watcher.log values
        self.lr: list[float] = []
        self.parts: dict[str, torch.Tensor] = {}  # added by the step site (loss scale, found_inf, weights)
        self.skip_known: bool | None = None  # the GradScaler's verdict, when a framework site ends the step
        self.optimizer_stepped = False  # the optimizer's step ran (a GradScaler's update() tells a skip by it)
        self.clip: ClipEffect | None = None  # what a clip function did to the reading's gradients

    @property
    def started(self) -> bool:
        """Whether the gradients were read (or the attempt failed): the step is under way."""
        return self.phase is not Phase.OPEN

    @property
    def failed(self) -> bool:
        """Whether monitoring failed in this step (it records nothing)."""
        return self.phase is Phase.FAILED

    def clip_effect(self) -> ClipEffect:
        """What clipping did to the read gradients, starting from their pre-clip norms at the first clip."""
        assert self.reading is not None, "clipping is only followed once the gradients were read"
        if self.clip is None:
            self.clip = ClipEffect(self.reading.norms[0])
        return self.clip

    def read(
        self, watched: WatchedTensors, grad_multiplier: stats.Multiplier, format_multiplier: stats.Multiplier
    ) -> None:
        """Read the gradients, replacing an earlier reading of this step."""
        if self.phase is Phase.FAILED:
            return
        if self.snapshot is None and watched.cadence.sampled(self.number) and watched.sharding is None:
            self.snapshot = stats.snapshot(watched.local_parameters())
        self.reading = watched.read_gradients(self.number, grad_multiplier, format_multiplier)
        self.clip = None
        self.phase = Phase.READ

    def add_losses(self, losses: Iterable[torch.Tensor]) -> None:
        if self.phase is not Phase.FAILED:
            self.losses.extend(loss.detach() for loss in losses)

    def log(self, scalars: dict[str, Any]) -> None:
        if self.phase is not Phase.FAILED:
            self.logged.update(scalars)

    def fail(self) -> None:
        """Drop everything of this step; what arrives until it ends is ignored."""
        self.phase = Phase.FAILED
        self.reading = None
        self.snapshot = None
        self.losses = []
        self.logged = {}
        self.parts = {}
        self.clip = None

    def finish(
        self,
        watched: WatchedTensors,
        *,
        step_time: float | None,
        module_parts: tuple[torch.Tensor, list[int]] | None,
        forward_parts: tuple[AttentionMaxima, torch.Tensor | None] | None = None,
        gemm: torch.Tensor | None = None,
    ) -> StepRecord:
        """The step's record, its one host copy started. Only for a READ measurement."""
        reading, device = self.reading, watched.device
        assert self.phase is Phase.READ and reading is not None
        stack = DeviceStack()
        stack.add(records.GRAD, reading.norms, owned=True)  # (a clip's effect starts from a copy)
        for name, part in {**reading.parts, **self.parts}.items():
            stack.add(name, part)
        if self.clip is not None:
            stack.add(records.POST_CLIP, self.clip.norms)
        host_scalars: dict[str, float] = {}
        logged_loss = None
        for name, value in self.logged.items():
            if isinstance(value, torch.Tensor):
                stack.add(
                    records.LOSS if name == "loss" else records.SCALAR_PREFIX + name,
                    value.detach().reshape(()).to(device, non_blocking=True),
                )
            elif name == "loss":
                logged_loss = float(value)
            else:
                host_scalars[name] = float(value)
        if self.losses and "loss" not in self.logged:
            # The loss whose gradient the step applies: the sum over the step's backwards
            # (micro-batches under accumulation, each usually divided by their number).
            # One backward (the usual case): the loss itself, which the host copy snapshots, or in
            # host memory already, read at once.
            loss = self.losses[0] if len(self.losses) == 1 else None
            if loss is not None and not accelerator_path(loss.device):
                logged_loss = float(loss.item())
            else:
                stack.add(
                    records.LOSS,
                    loss
                    if loss is not None
                    else torch.stack(
                        [loss.float().reshape(()).to(device, non_blocking=True) for loss in self.losses]
                    ).sum(),
                )
        module_order: list[int] = []
        if module_parts is not None:
            absmax, module_order = module_parts
            stack.add(records.ACTIVATION_ABSMAX, absmax)
        attention_calls: list[str] = []
        if forward_parts is not None:
            attention, output_logits = forward_parts
            if attention and attention.stacked is not None:
                attention_calls = list(attention)
                stack.add(records.ATTENTION_LOGIT_MAX, attention.stacked.to(device, non_blocking=True))
            if output_logits is not None:
                stack.add(records.OUTPUT_LOGITS, output_logits.to(device, non_blocking=True))
        if gemm is not None:
            stack.add(records.GEMM, gemm.to(device, non_blocking=True))
        return StepRecord(
            step_number=self.number,
            time=time.time(),
            step_time=step_time,
            host=stack.to_host(),
            n_tensors=len(watched.parameters),
            present=reading.present,
            lr=self.lr,
            scalars=host_scalars,
            format_max=watched.format.max,
            loss=logged_loss,
            module_order=module_order,
            attention_calls=attention_calls,
        )
