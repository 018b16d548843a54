"""Detectors run on ingest: they turn stored steps into events.

Pure functions over "step views" (dicts: step, time, loss, loss_scale, new_loss_scale,
global_grad_norm, headroom_bits, scale_decision, skipped, tensors: stat -> numpy array).
``detect(history, new_steps, config)`` judges only ``new_steps``; ``history`` is the run
rank's preceding stored steps (ascending), which rolling windows and episodes need.

Episode detectors (vanishing, underflow, collapse) fire once when their condition starts,
not on every step it lasts.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from numwatch.protocol import FORMAT_COUNT_STATS, NONFINITE_STATS, DetectorEventKind, encode_float, event_document

MAX_NAMED_TENSORS = 10


class DetectorConfig(BaseModel):
    """The detectors' thresholds: ``Settings.detect``, so each reads ``NUMWATCH_DETECT_<FIELD>`` on the collector."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    explosion_factor: float = Field(
        10.0, gt=0, description="global norm above this many times its rolling median is an explosion"
    )
    window: int = Field(
        50,
        ge=1,
        description="finite norms in the rolling median; also the steps for backoff counting and vanishing streaks",
    )
    min_history: int = Field(
        10, ge=1, description="finite norms needed before explosion is judged (a fresh run's first steps are not)"
    )
    vanishing_floor: float = Field(
        1e-10, ge=0, description="a tensor's grad norm below this for `window` consecutive steps is vanishing"
    )
    underflow_threshold: float = Field(
        0.01, ge=0, le=1, description="share of gradient elements the cast flushes to zero"
    )
    collapse_floor: float = Field(1.0, ge=0, description="a loss scale below this no longer scales anything up")
    collapse_backoffs: int = Field(5, ge=0, description="more backoffs than this within `window` steps is a collapse")
    spike_sigmas: float = Field(
        6.0, gt=0, description="a loss or global grad norm above mean + this many sigma of its window is a spike"
    )
    spike_window: int = Field(
        128, ge=2, description="finite values a spike is judged against (judged once this many precede it)"
    )
    spike_score_steps: int = Field(
        10_000, ge=1, description="the spike score is the share of spikes among this many last judged values"
    )
    attention_logit_threshold: float = Field(
        100.0,
        gt=0,
        description=(
            "an attention call's max logit above this is attention logit growth (QK-clip's default threshold "
            "in Megatron-LM and Kimi K2)"
        ),
    )
    # At initialisation log Z is about log(vocabulary), at most 12.5 for 262k tokens, and z-loss
    # holds it at 0; beyond 32 in magnitude bf16 logits are 0.25 apart, coarser than the gaps
    # between likely tokens.
    log_z_low: float = Field(-32.0, description="mean output log Z below this is log-Z drift")
    log_z_high: float = Field(32.0, description="mean output log Z above this is log-Z drift")
    # Across the ranks of a job (numwatch.monitor.detectors.ranks).
    rank_wait_steps: int = Field(
        16,
        ge=0,
        description="a step is judged across ranks once every rank sent it, or once more than half the ranks are "
        "this many steps past it (the missing ranks are named)",
    )
    rank_outlier_threshold: float = Field(
        8.0,
        gt=0,
        description="a rank whose local grad norm (log) or loss is more than this many robust sigmas (MAD) from "
        "the ranks' median is an outlier",
    )
    rank_outlier_min_ratio: float = Field(
        4.0,
        gt=1,
        description="an outlier's local grad norm is also this many times above or below the median (its loss "
        "this many times farther from the median than the median is from 0): small batches differ by 2x by chance",
    )
    rank_outlier_min_ranks: int = Field(4, ge=3, description="ranks needed before outliers among them are judged")
    straggler_factor: float = Field(
        1.2, gt=1, description="a rank whose compute time is above this many times the ranks' median is slow"
    )
    straggler_steps: int = Field(5, ge=1, description="slow for this many consecutive steps is a straggler")
    straggler_min_excess: float = Field(
        0.005, ge=0, description="seconds a slow rank's compute time must also exceed the median by (timer noise)"
    )
    # 20 dB: the error's RMS is a tenth of the operand's, where fp8 training recipes start to diverge
    # from their bf16 baselines; per-tensor e4m3 of well-scaled operands gives about 31 dB.
    gemm_sqnr_threshold: float = Field(
        20.0, description="a Linear's e4m3 forward SQNR (dB, the lower of its input's and its weight's) below this"
    )


def nonfinite_tensor_mask(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """Tensors with a NaN/Inf gradient: non-zero NaN/Inf counts or a non-finite norm."""
    norms = tensors.get("grad_norm")
    mask = np.zeros(0 if norms is None else len(norms), dtype=bool)
    if norms is not None:
        mask = ~np.isfinite(norms)
    for name in NONFINITE_STATS:
        if name in tensors:
            counts = tensors[name] > 0
            mask = counts if mask.size == 0 else mask | counts
    return mask


def has_nonfinite_grad(view: dict[str, Any]) -> bool:
    norm = view.get("global_grad_norm")
    return (norm is not None and not math.isfinite(norm)) or bool(nonfinite_tensor_mask(view["tensors"]).any())


def _event(view: dict[str, Any], kind: DetectorEventKind, **details: Any) -> dict[str, Any]:
    return dict(event_document(view["step"], kind, details, time=view["time"]))


def _scale(view: dict[str, Any]) -> float | None:
    return view["new_loss_scale"] if view.get("new_loss_scale") is not None else view.get("loss_scale")


def _nonfinite_details(view: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    tensors = view["tensors"]
    indices = np.flatnonzero(nonfinite_tensor_mask(tensors))
    named = []
    for index in indices[:MAX_NAMED_TENSORS]:
        entry: dict[str, Any] = {"index": int(index)}
        if names is not None and index < len(names):
            entry["name"] = names[index]
        for stat, key in (("nan_count", "nan"), ("inf_count", "inf")):
            if stat in tensors:
                entry[key] = int(tensors[stat][index])
        named.append(entry)
    return {
        "tensors": named,
        "tensor_count": int(len(indices)),
        "global_grad_norm": encode_float(view.get("global_grad_norm")),
    }


def _underflow_share(view: dict[str, Any], numel: np.ndarray | None) -> float | None:
    tensors = view["tensors"]
    if numel is None or not all(name in tensors for name in FORMAT_COUNT_STATS) or numel.sum() <= 0:
        return None
    return float(tensors["underflow"].sum() / numel.sum())


def _collapsed(scale: float | None, recent_backoffs: int, config: DetectorConfig) -> bool:
    return (scale is not None and scale < config.collapse_floor) or recent_backoffs > config.collapse_backoffs


def detect(
    history: list[dict[str, Any]],
    new_steps: list[dict[str, Any]],
    config: DetectorConfig,
    tensor_names: list[str] | None = None,
    tensor_numel: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Events for ``new_steps`` (ascending), judged with ``history`` (the preceding steps, ascending)."""
    events: list[dict[str, Any]] = []
    window = list(history)
    norms = [
        v["global_grad_norm"]
        for v in window
        if v["global_grad_norm"] is not None and math.isfinite(v["global_grad_norm"])
    ]
    backoff_steps = [v["step"] for v in window if v["scale_decision"] == "backoff"]
    # Vanishing streaks per tensor, carried over from the history.
    streak: np.ndarray | None = None
    for view in window:
        streak = _advance_streak(streak, view, config)
    previous_underflow = next(
        (s for s in (_underflow_share(v, tensor_numel) for v in reversed(window)) if s is not None), None
    )
    previous = window[-1] if window else None
    previous_collapsed = previous is not None and _collapsed(
        _scale(previous), sum(1 for s in backoff_steps if s > previous["step"] - config.window), config
    )

    for view in new_steps:
        if has_nonfinite_grad(view):
            events.append(_event(view, "nonfinite_grad", **_nonfinite_details(view, tensor_names)))
        loss = view.get("loss")
        if loss is not None and not math.isfinite(loss):
            events.append(_event(view, "nonfinite_loss", loss=encode_float(loss)))
        if view["scale_decision"] in ("backoff", "growth"):
            kind: DetectorEventKind = (
                "loss_scale_backoff" if view["scale_decision"] == "backoff" else "loss_scale_growth"
            )
            events.append(
                _event(view, kind, loss_scale=view.get("loss_scale"), new_loss_scale=view.get("new_loss_scale"))
            )
        if view["skipped"]:
            events.append(_event(view, "skipped_step", loss_scale=view.get("loss_scale")))

        norm = view["global_grad_norm"]
        if norm is not None and math.isfinite(norm):
            recent = norms[-config.window :]
            if len(recent) >= config.min_history:
                median = statistics.median(recent)  # on 50 Python floats, 20x faster than np.median
                if median > 0 and norm > config.explosion_factor * median:
                    events.append(
                        _event(
                            view,
                            "grad_explosion",
                            global_grad_norm=norm,
                            rolling_median=median,
                            factor=norm / median,
                            window=len(recent),
                        )
                    )
            norms.append(norm)

        streak = _advance_streak(streak, view, config)
        if streak is not None:
            started = np.flatnonzero(streak == config.window)
            if started.size:
                events.append(
                    _event(
                        view,
                        "vanishing_grad",
                        floor=config.vanishing_floor,
                        steps=config.window,
                        tensors=[
                            tensor_names[i] if tensor_names and i < len(tensor_names) else int(i)
                            for i in started[:MAX_NAMED_TENSORS]
                        ],
                        tensor_count=int(started.size),
                    )
                )

        share = _underflow_share(view, tensor_numel)
        if share is not None:
            if share > config.underflow_threshold and (
                previous_underflow is None or previous_underflow <= config.underflow_threshold
            ):
                events.append(
                    _event(view, "underflow_high", underflow_share=share, threshold=config.underflow_threshold)
                )
            previous_underflow = share

        if view["scale_decision"] == "backoff":
            backoff_steps.append(view["step"])
        recent_backoffs = sum(1 for s in backoff_steps if s > view["step"] - config.window)
        collapsed = _collapsed(_scale(view), recent_backoffs, config)
        if collapsed and not previous_collapsed:
            events.append(
                _event(
                    view,
                    "loss_scale_collapse",
                    loss_scale=_scale(view),
                    backoffs=recent_backoffs,
                    window=config.window,
                    floor=config.collapse_floor,
                )
            )
        previous_collapsed = collapsed
    return events


def _advance_streak(streak: np.ndarray | None, view: dict[str, Any], config: DetectorConfig) -> np.ndarray | None:
    """Consecutive steps each tensor's grad norm has been below the floor, including ``view``."""
    norms = view["tensors"].get("grad_norm")
    if norms is None:
        return streak
    below = np.isfinite(norms) & (norms < config.vanishing_floor)
    if streak is None or streak.shape != below.shape:
        streak = np.zeros(below.shape, dtype=np.int64)
    return np.where(below, streak + 1, 0)
