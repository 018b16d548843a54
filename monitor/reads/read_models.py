"""Response models of the run page's reads (floats as the protocol writes them: non-finite as text)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from numwatch.protocol import GemmOperand, GemmScheme, HistogramKind, QuantScheme, WireFloat

# What the gemm table sorts by: the fp8 recipe (e4m3 for X and W, e5m2 for dY) or one block scheme for all.
GemmRecipe = Literal["fp8", "mxfp8", "mxfp8_up", "nvfp4"]


class Series(BaseModel):
    steps: list[int]
    values: list[WireFloat]


class TensorSummary(BaseModel):
    """Whole-model series: shares of gradient elements per format-count outcome, means of sampled stats."""

    zeros: Series
    underflow: Series
    subnormal: Series
    overflow: Series
    update_ratio: Series
    stale_fraction: Series


class HistogramChoice(BaseModel):
    tensor: str
    step: int


class HistogramSteps(BaseModel):
    kind: HistogramKind
    rank: int
    steps: list[int] = Field(description="the sampled steps that have this kind of histogram, ascending")
    suggested: HistogramChoice | None = Field(
        description=(
            "what to show first: the first tensor that went non-finite, at the last sampled step before it "
            "(else the latest)"
        )
    )


class EventOut(BaseModel):
    step: int
    rank: int
    kind: str
    details: dict[str, Any]
    time: float
    time_ms: int


class Tail(BaseModel):
    """What a live page polls for: the steps after ``after`` and their events."""

    run: str
    status: str
    after: int
    steps: list[int]
    values: dict[str, list[WireFloat]] = Field(
        description="per-step scalar name -> one value per step (lr: the first group's)"
    )
    truncated: bool = Field(description="more steps follow: poll again with after = the last step")
    events: list[EventOut]


class QuantizedTensor(BaseModel):
    tensor: str
    shape: list[int]
    sqnr_db: dict[QuantScheme, WireFloat] = Field(
        description="20 log10(||w|| / ||w - Q(w)||) per scheme; Infinity when exact"
    )


class QuantizationTable(BaseModel):
    step: int | None = Field(description="the last step whose weights were measured; null before the first")
    rank: int
    sort: QuantScheme
    tensors: list[QuantizedTensor] = Field(description="weight tensors (2-D and up), lowest SQNR of `sort` first")


class GemmMeasures(BaseModel):
    sqnr_db: WireFloat = Field(
        description="10 log10(sum x^2 / sum (x - Q(x))^2); Infinity when exact, NaN if not finite"
    )
    flushed: WireFloat = Field(description="share of the non-zero elements Q flushes to zero")
    saturated: WireFloat = Field(
        description="share of the non-zero elements that saturate at the format's largest value"
    )


class GemmOperandReadiness(BaseModel):
    range_bits: WireFloat = Field(description="log2(amax / smallest non-zero |x|); 0 for an all-zero operand")
    schemes: dict[GemmScheme, GemmMeasures]


class GemmPair(BaseModel):
    operand: GemmOperand
    scheme: GemmScheme
    sqnr_db: WireFloat


class GemmLayer(BaseModel):
    tensor: str = Field(description="the Linear's weight: the matmuls measured are the F.linear calls using it")
    shape: list[int]
    worst: GemmPair = Field(description="the operand with the lowest SQNR under the sorted recipe")
    keep_bf16: bool = Field(description="the worst SQNR is below the threshold (or not finite)")
    operands: dict[GemmOperand, GemmOperandReadiness]


class GemmTable(BaseModel):
    step: int | None = Field(description="the last step whose matmuls were measured; null before the first")
    rank: int
    recipe: GemmRecipe
    threshold_db: float = Field(description="the collector's gemm_sqnr_low threshold")
    rows: int | None = Field(
        description="rows of each operand quantized (the run's gemm_rows): the numbers are estimates from them; "
        "null: every row, exact"
    )
    layers: list[GemmLayer] = Field(description="measured Linear weights, lowest SQNR under `recipe` first")


class AttentionRunMax(BaseModel):
    value: WireFloat = Field(description="the largest max attention logit of the run (NaN if any was NaN)")
    call: str = Field(description="the attention call (calling module) it was seen in")
    step: int


class ForwardSeries(BaseModel):
    rank: int
    steps: list[int] = Field(description="measured steps (with more than max_points: the last step of each bucket)")
    attention_logit_max: dict[str, list[WireFloat]] = Field(
        description="per attention call, forward order: its max logit at each step (a bucket's largest)"
    )
    run_max: AttentionRunMax | None = Field(description="null before any attention call was measured")
    log_z_mean: list[WireFloat] = Field(
        description="mean over tokens of logsumexp over the vocabulary (a bucket's mean)"
    )
    log_z_max: list[WireFloat] = Field(description="largest log Z over tokens (a bucket's largest)")
    logit_absmax: list[WireFloat] = Field(description="largest |output logit| (a bucket's largest)")
