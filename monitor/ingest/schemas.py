"""Pydantic models of the wire protocol's documents (``numwatch.protocol``), as the collector validates them.

Floats accept the protocol's "NaN"/"Infinity"/"-Infinity" strings; arrays are base64 text,
decoded to bytes and checked against their dtype here, and against the run's tensor count at ingest.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from numwatch import protocol

# By name: inside a document the name ``protocol`` is its version field.
from numwatch.protocol import Format, RunStatus

MAX_STEP = 2**62  # BIGINT with room to spare
MAX_RANK = 1_000_000
# Run start times are stored as datetimes, whose range ends with the year 9999; step and event
# times are read back in milliseconds too, which overflow near float's max.
MAX_EPOCH_SECONDS = datetime(9999, 12, 31, tzinfo=timezone.utc).timestamp()
EpochSeconds = Annotated[float, Field(ge=0, le=MAX_EPOCH_SECONDS, description="seconds since the Unix epoch")]
MAX_RUN_NAME = 512
RunName = Annotated[str, Field(min_length=1, max_length=MAX_RUN_NAME)]
ProjectName = Annotated[str, Field(min_length=1, max_length=200)]
Instance = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="one watching process; the ranks of a job share it",
    ),
]


def _decode_float(value: Any) -> float | None:
    # pydantic turns only ValueError into a 422; float() raises TypeError for a list or
    # object and OverflowError for an integer past float's range, which would be a 500.
    if value is not None and not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number or 'NaN'/'Infinity'/'-Infinity', got a JSON {type(value).__name__}")
    try:
        return protocol.decode_float(value)
    except OverflowError:
        raise ValueError("number out of the float range") from None


ProtocolFloat = Annotated[float | None, BeforeValidator(_decode_float)]
FiniteOrNonFinite = Annotated[float, BeforeValidator(_decode_float)]
MAX_ARRAY_TEXT = 256 * 1024 * 1024


def _decode_array(value: Any) -> bytes:
    # Decoded once, here: ingest works on the bytes (base64 decoding dominated ingest time).
    if not isinstance(value, str):
        raise ValueError("expected base64 array text (a string)")
    if len(value) > MAX_ARRAY_TEXT:
        raise ValueError(f"array text over {MAX_ARRAY_TEXT} characters")
    return protocol.unpack_bytes(value)


# Base64 text on the wire, raw little-endian bytes once validated.
ArrayBytes = Annotated[
    bytes,
    PlainValidator(_decode_array),
    WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64",
            "maxLength": MAX_ARRAY_TEXT,
            "description": "base64 of little-endian raw values",
        }
    ),
]


def _check_arrays(arrays: dict[str, bytes], dtypes: Mapping[str, str]) -> dict[str, bytes]:
    for name, raw in arrays.items():
        if name not in dtypes:
            raise ValueError(f"unknown stat {name!r}; known: {', '.join(dtypes)}")
        try:
            protocol.check_raw(raw, dtypes[name])
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None
    return arrays


def _fields_of_dtypes(dtypes: Mapping[str, str]) -> Any:
    """A validator checking each array field named in ``dtypes`` against its dtype there."""

    def check(cls: type, raw: bytes, info: ValidationInfo) -> bytes:
        assert info.field_name is not None  # set for a field validator
        _check_arrays({info.field_name: raw}, dtypes)
        return raw

    return field_validator(*dtypes)(classmethod(check))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(Strict):
    name: str = Field(min_length=1, max_length=1000)
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: str = Field(max_length=64)
    group: int = Field(
        ge=protocol.NO_PARAM_GROUP, description="optimizer param group; -1 when in none (no optimizer, frozen)"
    )


class RunDocument(Strict):
    protocol: protocol.ProtocolVersion
    run: RunName
    project: ProjectName = "default"
    rank: int = Field(ge=0, le=MAX_RANK)
    world_size: int = Field(ge=1, le=MAX_RANK)
    format: Format
    tensors: list[TensorSpec] = Field(max_length=1_000_000)
    modules: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    started_at: EpochSeconds
    instance: Instance | None = None
    resume: bool = False


class Activations(Strict):
    absmax: ArrayBytes
    nonfinite: ArrayBytes

    _arrays = _fields_of_dtypes(protocol.ACTIVATION_STATS)


class OutputLogits(Strict):
    log_z_mean: FiniteOrNonFinite
    log_z_max: FiniteOrNonFinite
    absmax: FiniteOrNonFinite


AttentionCall = Annotated[str, Field(min_length=1, max_length=1000)]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class LocalHealth(Strict):
    """One rank's gradient before the data-parallel reduction (protocol 4)."""

    grad_norm: FiniteOrNonFinite
    nonfinite: int = Field(ge=0, le=2**62)
    compute_time: ProtocolFloat = None
    nonfinite_tensors: list[Annotated[str, Field(max_length=1000)]] | None = Field(
        default=None, max_length=protocol.MAX_NONFINITE_TENSORS
    )
    checksum: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)


class StepDocument(Strict):
    step: int = Field(ge=1, le=MAX_STEP)
    time: EpochSeconds
    step_time: ProtocolFloat = None
    loss: ProtocolFloat = None
    loss_scale: ProtocolFloat = None
    new_loss_scale: ProtocolFloat = None
    scale_decision: protocol.ScaleDecision | None = None
    skipped: bool = False
    lr: list[FiniteOrNonFinite] = Field(default_factory=list, max_length=10_000)
    global_grad_norm: ProtocolFloat = None
    headroom_bits: ProtocolFloat = None
    clip_coef: ProtocolFloat = None
    post_clip_grad_norm: ProtocolFloat = None
    clipped: bool = False
    scalars: dict[str, ProtocolFloat] = Field(default_factory=dict)
    tensors: dict[str, ArrayBytes] = Field(default_factory=dict)
    activations: Activations | None = None
    attention_logit_max: dict[AttentionCall, FiniteOrNonFinite] | None = Field(default=None, max_length=10_000)
    output_logits: OutputLogits | None = None
    local: LocalHealth | None = None
    replicated_by: int | None = Field(
        default=None, ge=0, le=MAX_RANK, description="the rank that sent this step's replicated statistics"
    )

    @field_validator("tensors")
    @classmethod
    def _tensor_arrays(cls, arrays: dict[str, bytes]) -> dict[str, bytes]:
        return _check_arrays(arrays, protocol.TENSOR_STATS)


class HistogramDocument(Strict):
    step: int = Field(ge=1, le=MAX_STEP)
    kind: protocol.HistogramKind
    exponent: ArrayBytes
    linear_min: ArrayBytes
    linear_max: ArrayBytes
    linear: ArrayBytes

    _arrays = _fields_of_dtypes(protocol.HISTOGRAM_DTYPES)


class EventDocument(Strict):
    step: int = Field(ge=0, le=MAX_STEP)
    kind: str = Field(min_length=1, max_length=32)
    time: EpochSeconds
    details: dict[str, Any] = Field(default_factory=dict)


class BatchDocument(Strict):
    protocol: protocol.ProtocolVersion
    run: RunName
    rank: int = Field(ge=0, le=MAX_RANK)
    batch_id: str = Field(default="", max_length=200)
    instance: Instance | None = None
    steps: list[StepDocument] = Field(default_factory=list, max_length=100_000)
    histograms: list[HistogramDocument] = Field(default_factory=list, max_length=100_000)
    events: list[EventDocument] = Field(default_factory=list, max_length=100_000)
    status: RunStatus = "running"


class ErrorDetail(BaseModel):
    """A refusal: a message, the write API's list of invalid fields, or FastAPI's parameter errors."""

    detail: str | list[str] | list[dict[str, Any]]


class IngestResult(BaseModel):
    stored_steps: int
    duplicate_steps: int
    conflicting_steps: int = 0
    events: int = 0


class RunRegistered(BaseModel):
    run: str = Field(description="the name the run is stored under")
    rank: int
    created: bool
    renamed: bool = Field(
        False, description="another process held the name asked for: this one's data is stored as `run`"
    )


class RunDeleting(BaseModel):
    """A run marked for deletion: reads no longer see it; its rows are deleted in the background."""

    run: str
    status: Literal["deleting"] = "deleting"
