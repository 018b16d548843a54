"""The numwatch wire protocol, version 1: written down once, imported by both sides.

Standard library only, so the collector can import it without the training stack
and the training side can import it without the server stack.

Documents (JSON objects; the spool stores the very same documents, one per line):

``run`` document — ``POST /api/v1/runs``, sent once per (run, rank) when watching starts::

    {"protocol": 1, "run": str, "project": str, "rank": int, "world_size": int,
     "format": "fp16" | "bf16" | "fp8_e4m3" | "fp8_e5m2" | "fp32",
     "tensors": [{"name": str, "shape": [int], "dtype": str, "group": int}],
     "modules": [str],            # traced modules (activation tracing), else []
     "config": {str: JSON},       # anything the user passed, precision, model class...
     "started_at": float}         # epoch seconds

``batch`` document — ``POST /api/v1/runs/{run}/batches``::

    {"protocol": 1, "run": str, "rank": int, "batch_id": str,
     "steps": [step], "histograms": [histogram], "events": [event],
     "status": "running" | "finished" | "crashed"}

``step`` (one optimizer-step attempt; ``step`` counts attempts from 1, skipped included)::

    {"step": int, "time": float, "step_time": float | null,
     "loss": float | null, "loss_scale": float | null, "new_loss_scale": float | null,
     "scale_decision": "growth" | "backoff" | "none" | null, "skipped": bool,
     "lr": [float], "global_grad_norm": float, "headroom_bits": float | null,
     "scalars": {str: float},
     "tensors": {stat: array},        # only the stats measured at this step
     "activations": {"absmax": array, "nonfinite": array} | null}

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
import sys
from array import array
from typing import Any, Iterable, Sequence

PROTOCOL_VERSION = 1

# Target formats the format counts are taken against (names on the wire).
FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32")

# array dtype codes: '<f4' float32, '<f8' float64, '<i8' int64 (all little-endian).
_ARRAY_TYPECODES = {"<f4": "f", "<f8": "d", "<i8": "q"}

# Per-tensor statistics of a step and the dtype of their arrays.
TENSOR_STATS: dict[str, str] = {
    # every step
    "grad_norm": "<f4",
    "grad_absmax": "<f4",
    "nan_count": "<i8",
    "inf_count": "<i8",
    # format counts (``format_every``): what a cast of g*S to the run's format does
    "zeros": "<i8",
    "underflow": "<i8",
    "subnormal": "<i8",
    "overflow": "<i8",
    # sampled (``histogram_every``)
    "weight_norm": "<f4",
    "weight_absmax": "<f4",
    "update_ratio": "<f4",
    "stale_fraction": "<f4",
    "exp_avg_sq_underflow": "<f4",  # share of Adam's exp_avg_sq that is 0 or subnormal
}
FORMAT_COUNT_STATS = ("zeros", "underflow", "subnormal", "overflow")
ACTIVATION_STATS: dict[str, str] = {"absmax": "<f4", "nonfinite": "<i8"}

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
HISTOGRAM_KINDS = ("grad", "weight")

SCALE_DECISIONS = ("growth", "backoff", "none")
RUN_STATUSES = ("running", "finished", "crashed")

# Event kinds the client itself emits (the collector's detectors add their own).
CLIENT_EVENT_KINDS = ("nonfinite_origin", "monitoring_dropped")

_NONFINITE_TEXT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


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


def decode_float(value: float | int | str | None) -> float | None:
    """Inverse of :func:`encode_float`; raises ValueError on any other string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return _NONFINITE_TEXT[value]
        except KeyError:
            raise ValueError(f"not a number: {value!r} (non-finite floats are 'NaN', 'Infinity', '-Infinity')") from None
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return float(value)


def pack_array(values: Iterable[float] | Iterable[int], dtype: str) -> str:
    """Values as the protocol's base64 array text of ``dtype`` ('<f4', '<f8', '<i8')."""
    arr = array(_ARRAY_TYPECODES[dtype], values)
    if sys.byteorder != "little":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def pack_bytes(raw: bytes) -> str:
    """Already little-endian raw bytes (e.g. from a tensor) as array text."""
    return base64.b64encode(raw).decode("ascii")


def unpack_bytes(text: str, dtype: str, length: int | None = None) -> bytes:
    """Array text back to raw little-endian bytes, checking size (and length when given)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not base64 array text: {exc}") from None
    return check_raw(raw, dtype, length)


def check_raw(raw: bytes, dtype: str, length: int | None = None) -> bytes:
    """``raw`` if it holds a whole number of ``dtype`` values (exactly ``length`` when given); else ValueError."""
    itemsize = int(dtype[2:])
    if len(raw) % itemsize:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {dtype} values")
    if length is not None and len(raw) != length * itemsize:
        raise ValueError(f"expected {length} values, got {len(raw) // itemsize}")
    return raw


def unpack_array(text: str, dtype: str, length: int | None = None) -> list[float] | list[int]:
    """Array text back to a list of Python numbers (NaN and ±Inf bit-exact)."""
    arr = array(_ARRAY_TYPECODES[dtype])
    arr.frombytes(unpack_bytes(text, dtype, length))
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()


def dumps(document: dict[str, Any]) -> bytes:
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
