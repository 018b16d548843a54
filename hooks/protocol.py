"""The numwatch wire protocol, version 4: written down once, imported by both sides.

Version 2 added the Adam-health and quantization statistics (``V2_TENSOR_STATS``); version 3
the forward-pass statistics of sampled steps (``attention_logit_max``, ``output_logits``),
what clipping did (``clip_coef``, ``post_clip_grad_norm``, ``clipped``) and the run identity
(``instance``, ``resume``); version 4 each rank's local health before the gradient reduction
(``local``) and which rank sent a step's replicated statistics (``replicated_by``). The
collector still accepts older documents (old clients, old spools), which cannot carry them.
The matmuls' low-precision readiness (``GEMM_STATS``) came later as per-tensor statistics of
sampled steps, in any version (old clients just never send them; a collector that predates
them refuses them as unknown statistics).

Standard library only, so the collector can import it without the training stack
and the training side can import it without the server stack.

Documents (JSON objects; the spool stores the very same documents, one per line):

``run`` document — ``POST /api/v1/runs``, sent once per (run, rank) when watching starts::

    {"protocol": 3, "run": str, "project": str, "rank": int, "world_size": int,
     "format": "fp16" | "bf16" | "fp8_e4m3" | "fp8_e5m2" | "fp32",
     "tensors": [{"name": str, "shape": [int], "dtype": str, "group": int}],
     "modules": [str],            # traced modules (activation tracing), else []
     "config": {str: JSON},       # anything the user passed, precision, model class...
     "started_at": float,         # epoch seconds
     "instance": str | null,      # one watching process (all ranks of a job share it); null: the name is the identity
     "resume": bool}              # add to an existing run of this name (its steps continue after the last stored one)

A run name registered by another instance is not merged into: unless ``resume``, the
collector stores the new instance as a run named ``<run>-2`` (``-3``...) and answers with
that name (``RunRegistered.run``, ``renamed``).

``batch`` document — ``POST /api/v1/runs/{run}/batches``::

    {"protocol": 3, "run": str, "rank": int, "batch_id": str, "instance": str | null,
     "steps": [step], "histograms": [histogram], "events": [event],
     "status": "running" | "finished" | "crashed"}

``step`` (one optimizer-step attempt; ``step`` counts attempts from 1, skipped included)::

    {"step": int, "time": float, "step_time": float | null,
     "loss": float | null, "loss_scale": float | null, "new_loss_scale": float | null,
     "scale_decision": "growth" | "backoff" | "none" | null, "skipped": bool,
     "lr": [float], "global_grad_norm": float, "headroom_bits": float | null,
     "clip_coef": float | null,       # post-clip / pre-clip global norm; null: no clip function ran
     "post_clip_grad_norm": float | null, "clipped": bool,   # clipped: clip_coef != 1
     "scalars": {str: float},
     "tensors": {stat: array},        # only the stats measured at this step
     "activations": {"absmax": array, "nonfinite": array} | null,
     # forwards of sampled steps (``attention_every``), version 3:
     "attention_logit_max": {str: float} | null,  # per attention call (calling module), forward order
     "output_logits": {"log_z_mean": float, "log_z_max": float, "absmax": float} | null,
     # version 4: this rank's own health (null from single processes and older clients), and the rank
     # that sent this step's replicated statistics when not this one (see below)
     "local": local | null, "replicated_by": int | null}

``local`` (one rank's gradient before the data-parallel reduction, summed over its micro-batches)::

    {"grad_norm": float,              # L2 norm of the rank's local gradient
     "nonfinite": int,                # its NaN/Inf elements
     "compute_time": float | null,    # seconds from the step's first forward to the local gradient being ready
     "nonfinite_tensors": [str] | null,   # non-finite and sampled steps: tensors whose local gradient is not finite
     "checksum": int | null}          # sampled steps: sum of the replicated weights' bit patterns (int64, wrapping)

A step with ``replicated_by`` set carries no statistics of the watched tensors (``tensors``
holds only the matmuls' readiness, whose inputs are the rank's own; ``global_grad_norm`` is
null; no histograms): after the data-parallel reduction (DDP) or combined across shards (FSDP2)
they are the same on every rank of the group, and the group's first rank, ``replicated_by``,
sends them once.

``histogram`` (sampled steps)::

    {"step": int, "kind": "grad" | "weight",
     "exponent": array,               # int64, n_tensors x EXPONENT_BINS, row-major
     "linear_min": array, "linear_max": array,     # float32, n_tensors
     "linear": array}                 # int64, n_tensors x LINEAR_BINS, row-major

``event``::

    {"step": int, "kind": str, "time": float, "details": {str: JSON}}

Encodings:
- An *array* is the base64 text of the little-endian raw bytes of the values, with the
  dtype fixed by the protocol (``TENSOR_STATS``, ``ACTIVATION_STATS`` and the histogram
  fields above); element ``i`` belongs to ``tensors[i]`` of the run document. Binary
  arrays keep NaN and ±Inf bit-exact and decode without parsing numbers.
- A scalar float that is not finite is written as the JSON string ``"NaN"``,
  ``"Infinity"`` or ``"-Infinity"`` (plain JSON has no such numbers);
  :func:`encode_float` / :func:`decode_float` do both directions.
"""

from __future__ import annotations

import base64
import json
import math
import time as _time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict, get_args, overload

# -- wire types: each value set written once, as a Literal; the tuples derive from it --

ProtocolVersion = Literal[1, 2, 3, 4]
PROTOCOL_VERSION: ProtocolVersion = get_args(ProtocolVersion)[-1]

# The collector's runs: POST here registers one; run_path(run) + "/batches", "/events", ... write and read it.
RUNS_PATH = "/api/v1/runs"

# Target formats the format counts are taken against (names on the wire).
Format = Literal["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32"]
FORMATS: tuple[Format, ...] = get_args(Format)

# array dtype codes: '<f4' float32, '<f8' float64, '<i8' int64 (all little-endian).
ArrayDtype = Literal["<f4", "<f8", "<i8"]

# Per-tensor statistics of a step.
TensorStat = Literal[
    # every step
    "grad_norm",
    "grad_absmax",
    "nan_count",
    "inf_count",
    # format counts (``format_every``): what a cast of g*S to the run's format does
    "zeros",
    "underflow",
    "subnormal",
    "overflow",
    # sampled (``histogram_every``)
    "weight_norm",
    "weight_absmax",
    "update_ratio",
    "stale_fraction",
    "exp_avg_sq_underflow",  # share of Adam's exp_avg_sq that is 0 or subnormal
    # sampled, Adam family (version 2): RMS of the update before the learning rate, share where eps dominates
    "adam_update_rms",
    "adam_eps_dominated",
    # ``quant_every`` and close() (version 2): SQNR in dB of the weights under each scheme
    "quant_sqnr_int8",
    "quant_sqnr_int4",
    "quant_sqnr_nf4",
    "quant_sqnr_fp8",
]
# Stats measured together, in the row order of the array that holds them on both sides.
GRAD_STATS: tuple[TensorStat, ...] = ("grad_norm", "grad_absmax")
NONFINITE_STATS: tuple[TensorStat, ...] = ("nan_count", "inf_count")
WEIGHT_STATS: tuple[TensorStat, ...] = ("weight_norm", "weight_absmax")
UPDATE_STATS: tuple[TensorStat, ...] = ("update_ratio", "stale_fraction")
EVERY_STEP_STATS: tuple[TensorStat, ...] = (*GRAD_STATS, *NONFINITE_STATS)
QuantScheme = Literal["int8", "int4", "nf4", "fp8"]
QUANT_SCHEMES: tuple[QuantScheme, ...] = get_args(QuantScheme)
# An f-string is a plain str to mypy; each of these names is a TensorStat.
QUANT_SQNR_STATS: dict[QuantScheme, TensorStat] = {scheme: f"quant_sqnr_{scheme}" for scheme in QUANT_SCHEMES}  # type: ignore[misc]
ADAM_HEALTH_STATS: tuple[TensorStat, ...] = ("adam_update_rms", "adam_eps_dominated")
# Step fields version 3 added: the forward statistics and what clipping did.
V3_STEP_FIELDS = ("attention_logit_max", "output_logits", "clip_coef", "post_clip_grad_norm", "clipped")
V2_TENSOR_STATS: frozenset[TensorStat] = frozenset((*ADAM_HEALTH_STATS, *QUANT_SQNR_STATS.values()))
# Low-precision readiness of the matmuls (``gemm_every``): per Linear, stored under its weight
# tensor's index, what each scheme's quantize -> dequantize round trip does to the operands the
# matmul sees: X (input), W (weight), dY (output gradient). Per-tensor fp8 is e4m3 for X and W,
# e5m2 for dY; MXFP8 with the OCP scale rule ("mxfp8") and a round-up one ("mxfp8_up"); NVFP4.
GemmOperand = Literal["x", "w", "dy"]
GEMM_OPERANDS: tuple[GemmOperand, ...] = get_args(GemmOperand)
GemmScheme = Literal["e4m3", "e5m2", "mxfp8", "mxfp8_up", "nvfp4"]
GEMM_SCHEMES: tuple[GemmScheme, ...] = get_args(GemmScheme)
BLOCK_SCHEMES: tuple[GemmScheme, ...] = ("mxfp8", "mxfp8_up", "nvfp4")
GEMM_OPERAND_SCHEMES: dict[GemmOperand, tuple[GemmScheme, ...]] = {
    "x": ("e4m3", *BLOCK_SCHEMES),
    "w": ("e4m3", *BLOCK_SCHEMES),
    "dy": ("e5m2", *BLOCK_SCHEMES),
}
# SQNR in dB, the share of the non-zero elements flushed to zero, the share that saturates.
GemmMeasure = Literal["sqnr", "flushed", "saturated"]
GEMM_MEASURES: tuple[GemmMeasure, ...] = get_args(GemmMeasure)


def gemm_stat(operand: GemmOperand, scheme: GemmScheme | None, measure: GemmMeasure | Literal["range"]) -> str:
    """The stat name of one operand's measure under one scheme (``gemm_x_e4m3_sqnr``), or of its
    dynamic range, log2(amax / smallest non-zero |x|), which no scheme changes (``gemm_x_range``)."""
    return f"gemm_{operand}_range" if scheme is None else f"gemm_{operand}_{scheme}_{measure}"


# Per operand: its schemes' measures (scheme-major), then its range. NaN for tensors that are no
# Linear's weight, for operands not seen at that step, and for non-finite operands.
GEMM_OPERAND_STATS: dict[GemmOperand, tuple[str, ...]] = {
    operand: (
        *(gemm_stat(operand, scheme, measure) for scheme in schemes for measure in GEMM_MEASURES),
        gemm_stat(operand, None, "range"),
    )
    for operand, schemes in GEMM_OPERAND_SCHEMES.items()
}
GEMM_STATS: tuple[str, ...] = tuple(name for names in GEMM_OPERAND_STATS.values() for name in names)
FormatCountStat = Literal["zeros", "underflow", "subnormal", "overflow"]
FORMAT_COUNT_STATS: tuple[FormatCountStat, ...] = get_args(FormatCountStat)
_INTEGER_STATS = (*NONFINITE_STATS, *FORMAT_COUNT_STATS)
# The dtype of each stat's array; keyed by str, as the names read off the wire and out of the store are.
TENSOR_STATS: dict[str, ArrayDtype] = {
    **{name: "<i8" if name in _INTEGER_STATS else "<f4" for name in get_args(TensorStat)},
    **dict.fromkeys(GEMM_STATS, "<f4"),
}

# Per-module activation statistics of a step, and their dtypes.
ACTIVATION_STATS: dict[str, ArrayDtype] = {"absmax": "<f4", "nonfinite": "<i8"}

# Exponent histogram layout: one bin per binade floor(log2|x|) from EXPONENT_MIN to
# EXPONENT_MAX (the float32 range, subnormals included), then zero, +-Inf and NaN bins.
# Values of wider dtypes outside that range land in the first or last binade bin.
EXPONENT_MIN = -149
EXPONENT_MAX = 127
EXPONENT_BINADES = EXPONENT_MAX - EXPONENT_MIN + 1
EXPONENT_ZERO_BIN = EXPONENT_BINADES
EXPONENT_INF_BIN = EXPONENT_BINADES + 1
EXPONENT_NAN_BIN = EXPONENT_BINADES + 2
EXPONENT_BINS = EXPONENT_BINADES + 3
LINEAR_BINS = 64
HistogramKind = Literal["grad", "weight"]
HISTOGRAM_KINDS: tuple[HistogramKind, ...] = get_args(HistogramKind)
HistogramField = Literal["exponent", "linear_min", "linear_max", "linear"]
# Each histogram field's dtype (keyed by str, like TENSOR_STATS), and how many values it holds per tensor.
HISTOGRAM_DTYPES: dict[str, ArrayDtype] = {
    "exponent": "<i8",
    "linear_min": "<f4",
    "linear_max": "<f4",
    "linear": "<i8",
}
HISTOGRAM_LENGTHS: dict[HistogramField, int] = {
    "exponent": EXPONENT_BINS,
    "linear_min": 1,
    "linear_max": 1,
    "linear": LINEAR_BINS,
}

ScaleDecision = Literal["growth", "backoff", "none"]
RunStatus = Literal["running", "finished", "crashed"]

# Event kinds the client itself emits, and those the collector's detectors add.
ClientEventKind = Literal["nonfinite_origin", "monitoring_dropped"]
DetectorEventKind = Literal[
    "nonfinite_grad",
    "nonfinite_loss",
    "loss_scale_backoff",
    "loss_scale_growth",
    "skipped_step",
    "grad_explosion",
    "vanishing_grad",
    "underflow_high",
    "loss_scale_collapse",
    "loss_spike",
    "grad_norm_spike",
    "attention_logit_growth",
    "log_z_drift",
    "gemm_sqnr_low",
    # across ranks (numwatch.monitor.detectors.ranks)
    "rank_nonfinite",
    "rank_outlier",
    "straggler",
    "replica_divergence",
]
EventKind = Literal[ClientEventKind, DetectorEventKind]

# An encoded float (see encode_float) and an array's base64 text.
WireFloat = float | str | None
ArrayText = str


# A tensor's optimizer param group; one outside every group of the watched optimizer (or with no
# optimizer known yet) has NO_PARAM_GROUP.
NO_PARAM_GROUP = -1


class TensorSpec(TypedDict):
    name: str
    shape: list[int]
    dtype: str
    group: int


class RunDocument(TypedDict):
    protocol: ProtocolVersion
    run: str
    project: str
    rank: int
    world_size: int
    format: Format
    tensors: list[TensorSpec]
    modules: list[str]
    config: dict[str, Any]
    started_at: float
    instance: str | None
    resume: bool


class Activations(TypedDict):
    absmax: ArrayText
    nonfinite: ArrayText


# Output-logit statistics over a step's tokens: log Z = logsumexp over the vocabulary.
OutputLogitStat = Literal["log_z_mean", "log_z_max", "absmax"]
OUTPUT_LOGIT_STATS: tuple[OutputLogitStat, ...] = get_args(OutputLogitStat)
# The first protocol version with the forward-pass fields of a step.
FORWARD_STATS_VERSION = 3
# The first protocol version with each rank's local health (``local``).
LOCAL_HEALTH_VERSION = 4
# At most this many non-finite local tensors are named per step.
MAX_NONFINITE_TENSORS = 32


class LocalHealth(TypedDict):
    grad_norm: WireFloat
    nonfinite: int
    compute_time: WireFloat
    nonfinite_tensors: list[str] | None
    checksum: int | None


class StepDocument(TypedDict):
    step: int
    time: float
    step_time: WireFloat
    loss: WireFloat
    loss_scale: WireFloat
    new_loss_scale: WireFloat
    scale_decision: ScaleDecision | None
    skipped: bool
    lr: list[WireFloat]
    global_grad_norm: WireFloat
    headroom_bits: WireFloat
    clip_coef: WireFloat
    post_clip_grad_norm: WireFloat
    clipped: bool
    scalars: dict[str, WireFloat]
    tensors: dict[str, ArrayText]
    activations: Activations | None
    attention_logit_max: dict[str, WireFloat] | None
    output_logits: dict[OutputLogitStat, WireFloat] | None
    local: LocalHealth | None
    replicated_by: int | None


class HistogramDocument(TypedDict):
    step: int
    kind: HistogramKind
    exponent: ArrayText
    linear_min: ArrayText
    linear_max: ArrayText
    linear: ArrayText


class EventDocument(TypedDict):
    step: int
    kind: EventKind
    time: float
    details: dict[str, Any]


class BatchDocument(TypedDict):
    protocol: ProtocolVersion
    run: str
    rank: int
    batch_id: str
    instance: str | None
    steps: list[StepDocument]
    histograms: list[HistogramDocument]
    events: list[EventDocument]
    status: RunStatus


_NONFINITE_TEXT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def run_path(run: str, safe: str = "") -> str:
    """``RUNS_PATH/<run>``, the name percent-encoded as one path segment (but for the characters in ``safe``)."""
    return f"{RUNS_PATH}/{urllib.parse.quote(run, safe=safe)}"


def encode_float(value: float | None) -> float | str | None:
    """A float as JSON can carry it: non-finite values become "NaN"/"Infinity"/"-Infinity"."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


@overload
def decode_float(value: float | str) -> float: ...
@overload
def decode_float(value: None) -> None: ...
@overload
def decode_float(value: float | str | None) -> float | None: ...
def decode_float(value: float | str | None) -> float | None:
    """Inverse of :func:`encode_float`; raises ValueError on any other string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return _NONFINITE_TEXT[value]
        except KeyError:
            raise ValueError(
                f"not a number: {value!r} (non-finite floats are 'NaN', 'Infinity', '-Infinity')"
            ) from None
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return float(value)


def run_document(
    run: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    format: Format,
    tensors: list[TensorSpec],
    project: str = "default",
    modules: Sequence[str] = (),
    config: dict[str, Any] | None = None,
    started_at: float | None = None,
    instance: str | None = None,
    resume: bool = False,
) -> RunDocument:
    """A ``run`` document (``started_at`` defaults to now)."""
    return {
        "protocol": PROTOCOL_VERSION,
        "run": run,
        "project": project,
        "rank": rank,
        "world_size": world_size,
        "format": format,
        "tensors": list(tensors),
        "modules": list(modules),
        "config": dict(config or {}),
        "started_at": _time.time() if started_at is None else started_at,
        "instance": instance,
        "resume": resume,
    }


def scale_decision(before: float | None, after: float | None) -> ScaleDecision | None:
    """What the GradScaler's update did to the loss scale; None without a scaler."""
    if before is None or after is None:
        return None
    return "growth" if after > before else "backoff" if after < before else "none"


def step_document(
    step: int,
    *,
    time: float,
    tensors: dict[str, ArrayText],
    step_time: float | None = None,
    loss: float | None = None,
    loss_scale: float | None = None,
    new_loss_scale: float | None = None,
    skipped: bool = False,
    lr: Iterable[float] = (),
    global_grad_norm: float | None = None,
    headroom_bits: float | None = None,
    clip_coef: float | None = None,
    post_clip_grad_norm: float | None = None,
    scalars: dict[str, float] | None = None,
    activations: Activations | None = None,
    attention_logit_max: dict[str, float] | None = None,
    output_logits: dict[OutputLogitStat, float] | None = None,
    local: LocalHealth | None = None,
    replicated_by: int | None = None,
) -> StepDocument:
    """A ``step`` document from plain floats (encoded here); the scale decision follows from the two scales."""
    return {
        "step": step,
        "time": time,
        "step_time": encode_float(step_time),
        "loss": encode_float(loss),
        "loss_scale": encode_float(loss_scale),
        "new_loss_scale": encode_float(new_loss_scale),
        "scale_decision": scale_decision(loss_scale, new_loss_scale),
        "skipped": skipped,
        "lr": [encode_float(value) for value in lr],
        "global_grad_norm": encode_float(global_grad_norm),
        "headroom_bits": encode_float(headroom_bits),
        "clip_coef": encode_float(clip_coef),
        "post_clip_grad_norm": encode_float(post_clip_grad_norm),
        "clipped": clip_coef is not None and not clip_coef == 1.0,
        "scalars": {name: encode_float(value) for name, value in (scalars or {}).items()},
        "tensors": tensors,
        "activations": activations,
        "attention_logit_max": None
        if attention_logit_max is None
        else {name: encode_float(v) for name, v in attention_logit_max.items()},
        "output_logits": None
        if output_logits is None
        else {name: encode_float(v) for name, v in output_logits.items()},
        "local": local,
        "replicated_by": replicated_by,
    }


def local_health(
    grad_norm: float,
    nonfinite: int,
    *,
    compute_time: float | None = None,
    nonfinite_tensors: Sequence[str] | None = None,
    checksum: int | None = None,
) -> LocalHealth:
    """A step's ``local`` part from plain values (floats encoded here, at most ``MAX_NONFINITE_TENSORS`` named)."""
    return {
        "grad_norm": encode_float(grad_norm),
        "nonfinite": int(nonfinite),
        "compute_time": encode_float(compute_time),
        "nonfinite_tensors": None if nonfinite_tensors is None else list(nonfinite_tensors)[:MAX_NONFINITE_TENSORS],
        "checksum": checksum,
    }


def histogram_document(
    step: int,
    kind: HistogramKind,
    *,
    exponent: ArrayText,
    linear_min: ArrayText,
    linear_max: ArrayText,
    linear: ArrayText,
) -> HistogramDocument:
    """A ``histogram`` document (arrays of the ``HISTOGRAM_DTYPES`` dtypes, ``HISTOGRAM_LENGTHS`` values per tensor)."""
    return {
        "step": step,
        "kind": kind,
        "exponent": exponent,
        "linear_min": linear_min,
        "linear_max": linear_max,
        "linear": linear,
    }


def event_document(step: int, kind: EventKind, details: dict[str, Any], time: float | None = None) -> EventDocument:
    """An ``event`` document (stamped now unless ``time`` is given)."""
    return {"step": step, "kind": kind, "time": _time.time() if time is None else time, "details": details}


def batch_document(
    run: str,
    *,
    rank: int = 0,
    steps: Sequence[StepDocument] = (),
    histograms: Sequence[HistogramDocument] = (),
    events: Sequence[EventDocument] = (),
    status: RunStatus = "running",
    batch_id: str | None = None,
    instance: str | None = None,
) -> BatchDocument:
    """A ``batch`` document; ``batch_id`` defaults to a fresh random one."""
    return {
        "protocol": PROTOCOL_VERSION,
        "run": run,
        "rank": rank,
        "batch_id": uuid.uuid4().hex if batch_id is None else batch_id,
        "instance": instance,
        "steps": list(steps),
        "histograms": list(histograms),
        "events": list(events),
        "status": status,
    }


def pack_bytes(raw: bytes) -> str:
    """Already little-endian raw bytes (e.g. from a tensor) as array text."""
    return base64.b64encode(raw).decode("ascii")


def unpack_bytes(text: str) -> bytes:
    """Array text back to its raw little-endian bytes (ValueError if it is not base64);
    :func:`check_raw` then checks them against the field's dtype."""
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as error:  # binascii.Error, non-ASCII text
        raise ValueError(f"not base64 array text: {error}") from None


def check_raw(raw: bytes, dtype: str, length: int | None = None) -> bytes:
    """``raw`` if it holds a whole number of ``dtype`` values (exactly ``length`` when given); else ValueError."""
    itemsize = int(dtype[2:])
    if len(raw) % itemsize:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {dtype} values")
    if length is not None and len(raw) != length * itemsize:
        raise ValueError(f"expected {length} values, got {len(raw) // itemsize}")
    return raw


def dumps(document: Mapping[str, Any]) -> bytes:
    """A protocol document as compact UTF-8 JSON. Floats must already be encoded:
    a bare NaN/Inf raises instead of producing invalid JSON."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")


def loads(data: bytes | str) -> Any:
    """Parse a protocol document; bare NaN/Infinity tokens are rejected (not valid JSON)."""
    return json.loads(data, parse_constant=_reject_constant)


def _reject_constant(token: str) -> None:
    raise ValueError(f"bare {token} is not valid JSON; write it as the string {token!r}")


def tensor_schema_key(tensors: Sequence[dict[str, Any]]) -> list[tuple[str, tuple[int, ...], str]]:
    """What must match when a run is registered again: names, shapes and dtypes in order."""
    return [(t["name"], tuple(t["shape"]), t["dtype"]) for t in tensors]
