"""A measured step on the host side, and the protocol documents built from it.

The watcher adds a step's device statistics to a :class:`~numwatch.step.hostcopy.DeviceStack`
under the part names below; :class:`StepRecord` reads the host copy and builds the
``step``, ``histogram`` and ``event`` documents (on the sender thread). Gradient-based
parts cover only the tensors that had a gradient at that step (``present``); the record
spreads them over the run's full tensor list, with zeros for the others (no gradient is a
zero gradient, as for ``clip_grad_norm_``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from numwatch import protocol
from numwatch.capture.local_grads import LOCAL_CHECKSUM, LOCAL_NONFINITE, LOCAL_NORMS, LocalMeta
from numwatch.step.documents import StepDocuments
from numwatch.step.hostcopy import DeviceStack, HostStack

# Part names in the device stack, and the protocol statistics each one holds (rows).
GRAD = "grad"  # float32 [2, k]: grad_norm, grad_absmax
NONFINITE = "nonfinite"  # int64 [2, k]: nan_count, inf_count
FORMAT = "format"  # int64 [4, k]: zeros, underflow, subnormal, overflow
WEIGHT = "weight"  # float32 [2, n]: weight_norm, weight_absmax
UPDATE = "update"  # float32 [2, k]: update_ratio, stale_fraction
EXP_AVG_SQ = "exp_avg_sq_underflow"  # float32 [n]
ADAM = "adam"  # float32 [2, n]: adam_update_rms, adam_eps_dominated
QUANT = "quant"  # float32 [4, n]: quant_sqnr_* in protocol.QUANT_SCHEMES order
LOSS = "loss"
LOSS_SCALE = "loss_scale"
NEW_LOSS_SCALE = "new_loss_scale"
FOUND_INF = "found_inf"
POST_CLIP = "post_clip"  # float32 [k]: each tensor's norm after a clip function ran
ACTIVATION_ABSMAX = "activation_absmax"  # float32 [m]
ATTENTION_LOGIT_MAX = "attention_logit_max"  # float32 [a]: per attention call, names in StepRecord.attention_calls
OUTPUT_LOGITS = "output_logits"  # [3]: protocol.OUTPUT_LOGIT_STATS
GEMM = "gemm"  # float32 [len(protocol.GEMM_STATS), n]: matmul operands' low-precision readiness, per weight
SCALAR_PREFIX = "scalar:"

_ROWS: dict[str, tuple[str, ...]] = {
    GRAD: protocol.GRAD_STATS,
    NONFINITE: protocol.NONFINITE_STATS,
    FORMAT: protocol.FORMAT_COUNT_STATS,
    UPDATE: protocol.UPDATE_STATS,
    WEIGHT: protocol.WEIGHT_STATS,
    ADAM: protocol.ADAM_HEALTH_STATS,
    QUANT: tuple(protocol.QUANT_SQNR_STATS[scheme] for scheme in protocol.QUANT_SCHEMES),
    GEMM: protocol.GEMM_STATS,
}
_GRAD_BASED = (GRAD, NONFINITE, FORMAT, UPDATE)


def histogram_part(kind: str, field_name: str) -> str:
    """Stack part name of one histogram field ('exponent', 'linear_min', 'linear_max', 'linear')."""
    return f"hist:{kind}:{field_name}"


@dataclass
class StepRecord:
    """One measured step awaiting its documents; ``build`` runs on the sender thread."""

    step_number: int
    time: float
    step_time: float | None
    host: HostStack
    n_tensors: int
    present: list[int] | None  # indices of tensors with a gradient; None: all of them
    lr: list[float]
    scalars: dict[str, float]
    format_max: float
    loss: float | None = None  # host value given to watcher.log
    module_order: list[int] = field(default_factory=list)  # traced modules in first-call order
    attention_calls: list[str] = field(default_factory=list)  # names of the ATTENTION_LOGIT_MAX values
    events: list[protocol.EventDocument] = field(default_factory=list)
    late: HostStack | None = None  # device values logged or measured after the step ended, copied by seal()
    supplement: HostStack | None = None  # statistics a re-sent copy of the step adds (see supplemented)
    local: LocalMeta | None = None  # this rank's gradient before the reduction (LOCAL_* parts in ``host``)
    replicated_by: int | None = None  # the rank sending the replicated statistics, when not this one
    _late_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _late_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    _logged_late: bool = False

    # -- values logged after the step ended (before the model's next forward) -------------

    def log_late(self, scalars: dict[str, Any]) -> None:
        """Attach ``watcher.log`` values that arrive after the step ended; later values win."""
        self._logged_late = True
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                self._late_tensors[name] = value.detach().reshape(())
            elif name == "loss":
                self._late_tensors.pop(name, None)
                self.loss = float(value)
            else:
                self._late_tensors.pop(name, None)
                self.scalars[name] = float(value)

    def add_late_parts(self, parts: dict[str, torch.Tensor]) -> None:
        """Per-tensor statistics measured after the step ended (close() measuring the final weights)."""
        self._late_parts.update(parts)

    def has_part(self, name: str) -> bool:
        return any(name in stack for stack in self._stacks()) or name in self._late_parts

    def seal(self) -> bool:
        """No more values come: start the host copy of the late device values. Whether any value came late."""
        if not self._late_tensors and not self._late_parts:
            return self._logged_late
        stack = DeviceStack()
        for name, value in self._late_tensors.items():
            self.scalars.pop(name, None)
            stack.add(LOSS if name == "loss" else SCALAR_PREFIX + name, value)
        for name, value in self._late_parts.items():
            stack.add(name, value)
        self._late_tensors, self._late_parts = {}, {}
        self.late = stack.to_host()
        return True

    def supplemented(self, parts: dict[str, torch.Tensor]) -> StepRecord:
        """A copy of this sent step that adds ``parts``: the collector extends the stored step
        with statistics it lacks (everything else is the same, so it is no conflict)."""
        stack = DeviceStack()
        for name, value in parts.items():
            stack.add(name, value)
        return replace(self, events=[], supplement=stack.to_host(), _late_tensors={}, _late_parts={})

    def _stacks(self) -> list[HostStack]:
        return [stack for stack in (self.host, self.late, self.supplement) if stack is not None]

    # -- host values, also used on the training thread for non-finite checks ----------

    def grad_rows(self) -> np.ndarray:
        """grad_norm and grad_absmax of the present tensors, float32 [2, k]."""
        return self.host.get(GRAD, "<f4")

    def nonfinite_rows(self) -> np.ndarray | None:
        """nan/inf counts of the present tensors, int64 [2, k], when they were counted."""
        return self.host.get(NONFINITE) if NONFINITE in self.host else None

    def loss_value(self) -> float | None:
        """The step's loss: logged late on the device, logged on the host, else captured or logged on the device."""
        if self.late is not None and LOSS in self.late:
            return self.late.scalar(LOSS)
        if self.loss is not None:
            return self.loss
        return self.host.scalar(LOSS) if LOSS in self.host else None

    def skipped(self) -> bool:
        """Whether the GradScaler skipped the optimizer step (found Inf/NaN)."""
        return FOUND_INF in self.host and self.host.scalar(FOUND_INF) != 0.0

    def present_indices(self) -> np.ndarray:
        """Schema indices of the tensors the gradient statistics cover."""
        return np.arange(self.n_tensors) if self.present is None else np.asarray(self.present, dtype=np.int64)

    # -- documents --------------------------------------------------------------------

    def build(self) -> StepDocuments:
        """The step document, its histograms and events."""
        for stack in self._stacks():
            stack.wait()
        return StepDocuments(self._step_document(), self._histograms(), self.events)

    def _spread(self, values: np.ndarray, part: str) -> np.ndarray:
        """Gradient-based values of the present tensors spread over all tensors (zeros elsewhere)."""
        if part not in _GRAD_BASED or self.present is None:
            return values
        full = np.zeros(values.shape[:-1] + (self.n_tensors,), dtype=values.dtype)
        full[..., self.present_indices()] = values
        return full

    def _tensor_stats(self, skipped: bool) -> dict[str, str]:
        stats: dict[str, str] = {}
        for part, names in _ROWS.items():
            if self.replicated_by is not None and part != GEMM:
                continue  # the group's first rank sends them; the matmuls' inputs are this rank's own
            stack = next((stack for stack in self._stacks() if part in stack), None)
            if stack is None or (part == UPDATE and skipped):
                continue  # an update measured across a skipped step says nothing
            rows = self._spread(stack.get(part), part)
            for name, row in zip(names, rows, strict=True):
                stats[name] = protocol.pack_bytes(row.astype(protocol.TENSOR_STATS[name]).tobytes())
        if EXP_AVG_SQ in self.host and self.replicated_by is None:
            stats[EXP_AVG_SQ] = protocol.pack_bytes(self.host.get(EXP_AVG_SQ, "<f4").tobytes())
        return stats

    def local_health(self) -> protocol.LocalHealth | None:
        """This rank's gradient before the reduction, when the step had a synchronising backward."""
        if self.local is None or LOCAL_NORMS not in self.host:
            return None
        norms = self.host.get(LOCAL_NORMS)
        nonfinite = int(self.host.get(LOCAL_NONFINITE))
        with np.errstate(over="ignore", invalid="ignore"):
            grad_norm = float(np.sqrt(np.sum(norms * norms)))
        named = None
        if nonfinite or self.local.sampled or not math.isfinite(grad_norm):
            named = [name for name, norm in zip(self.local.names, norms, strict=True) if not math.isfinite(norm)]
        compute_time = self.local.compute_time()
        return protocol.local_health(
            grad_norm,
            nonfinite,
            compute_time=None if compute_time is None else round(compute_time, 6),  # microseconds are plenty
            nonfinite_tensors=named,
            checksum=int(self.host.get(LOCAL_CHECKSUM)) if LOCAL_CHECKSUM in self.host else None,
        )

    def global_grad_norm(self) -> float:
        """sqrt(sum of squared per-tensor norms), in float64: what clip_grad_norm_ sees."""
        norms = self.grad_rows()[0].astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.sqrt(np.sum(norms * norms)))

    def post_clip_grad_norm(self) -> float | None:
        """The global norm after clipping, when a clip function touched the watched gradients."""
        if POST_CLIP not in self.host:
            return None
        norms = self.host.get(POST_CLIP).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.sqrt(np.sum(norms * norms)))

    def clip_coef(self) -> float | None:
        """The factor clipping changed the global norm by (torch's coefficient for norm clipping):
        1.0 when it changed nothing, NaN when the pre-clip norm was not finite."""
        after = self.post_clip_grad_norm()
        if after is None:
            return None
        before = self.global_grad_norm()
        if before == 0.0:
            return 1.0
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return float(np.float64(after) / np.float64(before))

    def headroom_bits(self) -> float | None:
        """log2(format max / (S * largest |g|)); None when no tensor had a gradient."""
        absmax = self.grad_rows()[1].astype(np.float64)
        if absmax.size == 0:
            return None
        scale = self.host.scalar(LOSS_SCALE) if LOSS_SCALE in self.host else 1.0
        largest = math.nan if np.isnan(absmax).any() else float(absmax.max()) * scale
        if math.isnan(largest):
            return math.nan
        if largest == 0.0:
            return math.inf
        return math.log2(self.format_max / largest) if math.isfinite(largest) else -math.inf

    def _activations(self) -> protocol.Activations | None:
        if ACTIVATION_ABSMAX not in self.host:
            return None
        absmax = self.host.get(ACTIVATION_ABSMAX, "<f4")
        nonfinite = (~np.isfinite(absmax)).astype("<i8")
        return {"absmax": protocol.pack_bytes(absmax.tobytes()), "nonfinite": protocol.pack_bytes(nonfinite.tobytes())}

    def attention_logit_max(self) -> dict[str, float] | None:
        """The step's max attention logit per attention call, when its forward was measured."""
        if ATTENTION_LOGIT_MAX not in self.host:
            return None
        return dict(zip(self.attention_calls, self.host.get(ATTENTION_LOGIT_MAX).tolist(), strict=True))

    def _output_logits(self) -> dict[protocol.OutputLogitStat, float] | None:
        if OUTPUT_LOGITS not in self.host:
            return None
        return dict(zip(protocol.OUTPUT_LOGIT_STATS, self.host.get(OUTPUT_LOGITS).tolist(), strict=True))

    def _step_document(self) -> protocol.StepDocument:
        skipped = self.skipped()
        scalars = dict(self.scalars)
        for stack in self._stacks():
            for name in stack.names():
                if name.startswith(SCALAR_PREFIX):
                    scalars[name[len(SCALAR_PREFIX) :]] = stack.scalar(name)
        replicated_elsewhere = self.replicated_by is not None  # the group's first rank sends the shared values
        scaled = LOSS_SCALE in self.host and not replicated_elsewhere
        return protocol.step_document(
            self.step_number,
            time=self.time,
            step_time=self.step_time,
            loss=self.loss_value(),
            loss_scale=self.host.scalar(LOSS_SCALE) if scaled else None,
            new_loss_scale=self.host.scalar(NEW_LOSS_SCALE) if scaled else None,
            skipped=skipped,
            lr=[] if replicated_elsewhere else self.lr,
            global_grad_norm=None if replicated_elsewhere else self.global_grad_norm(),
            headroom_bits=None if replicated_elsewhere else self.headroom_bits(),
            clip_coef=None if replicated_elsewhere else self.clip_coef(),
            post_clip_grad_norm=None if replicated_elsewhere else self.post_clip_grad_norm(),
            scalars=scalars,
            tensors=self._tensor_stats(skipped),
            activations=self._activations(),
            attention_logit_max=self.attention_logit_max(),
            output_logits=self._output_logits(),
            local=self.local_health(),
            replicated_by=self.replicated_by,
        )

    def _histograms(self) -> list[protocol.HistogramDocument]:
        documents = []
        for kind in protocol.HISTOGRAM_KINDS:
            if histogram_part(kind, "exponent") not in self.host or self.replicated_by is not None:
                continue
            spread = kind == "grad" and self.present is not None
            fields: dict[str, str] = {}
            for field_name, dtype in protocol.HISTOGRAM_DTYPES.items():
                values = self.host.get(histogram_part(kind, field_name), dtype)
                if spread:
                    full = np.zeros((self.n_tensors,) + values.shape[1:], dtype=values.dtype)
                    full[self.present_indices()] = values
                    values = full
                fields[field_name] = protocol.pack_bytes(np.ascontiguousarray(values).tobytes())
            documents.append(protocol.histogram_document(self.step_number, kind, **fields))
        return documents
