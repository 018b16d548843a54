"""Events from the low-precision readiness of the matmuls of sampled steps (pure functions over step views).

``gemm_sqnr_low``: a Linear's e4m3 forward SQNR, the lower of its input's (X) and its weight's (W)
SQNR under per-tensor e4m3 scaling, is below ``gemm_sqnr_threshold`` at a measured step and was
not at the previous measured step: once per episode, naming every layer that crossed at that step.
A NaN (an operand not measured, or non-finite, which the non-finite detectors report) is not below.

The state carried between batches is ``rank_state.gemm_state``: the last measured step, the layers
below the threshold there, and the lowest SQNR per operand and scheme over its layers (for ``/metrics``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numwatch.monitor.detectors.rules import MAX_NAMED_TENSORS, DetectorConfig
from numwatch.protocol import GEMM_OPERAND_SCHEMES, encode_float, event_document, gemm_stat

FORWARD_E4M3 = (gemm_stat("x", "e4m3", "sqnr"), gemm_stat("w", "e4m3", "sqnr"))


def forward_e4m3_sqnr(tensors: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per tensor the lower of X's and W's e4m3 SQNR (one of them where the other is NaN); None
    when the step has no matmul measurements."""
    if not all(name in tensors for name in FORWARD_E4M3):
        return None
    with np.errstate(invalid="ignore"):
        return np.fmin(tensors[FORWARD_E4M3[0]], tensors[FORWARD_E4M3[1]])


def sqnr_minima(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The lowest SQNR over the measured layers (NaN left out) per "<operand>:<scheme>", protocol-encoded."""
    minima = {}
    for operand, schemes in GEMM_OPERAND_SCHEMES.items():
        for scheme in schemes:
            values = tensors.get(gemm_stat(operand, scheme, "sqnr"))
            measured = values[~np.isnan(values)] if values is not None else np.zeros(0)
            if measured.size:
                minima[f"{operand}:{scheme}"] = encode_float(float(measured.min()))
    return minima


def detect(
    state: dict[str, Any], views: list[dict[str, Any]], config: DetectorConfig, names: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events of ``views`` (ascending steps) after ``state`` (the last measured step's), and the new state.
    Steps at or before the state's are neither judged nor kept (they arrived late)."""
    events = []
    below_before = set(state.get("below", []))
    threshold = config.gemm_sqnr_threshold
    for view in views:
        sqnr = forward_e4m3_sqnr(view["tensors"])
        if sqnr is None or view["step"] <= state.get("step", 0):
            continue
        with np.errstate(invalid="ignore"):
            below = {int(i) for i in np.flatnonzero(np.isfinite(sqnr) & (sqnr < threshold))}
        crossed = sorted(below - below_before)
        if crossed:
            layers = [
                {"name": names[i] if i < len(names) else str(i), "index": i, "sqnr_db": encode_float(float(sqnr[i]))}
                for i in sorted(crossed, key=lambda i: sqnr[i])[:MAX_NAMED_TENSORS]
            ]
            details = {"threshold": threshold, "layers": layers, "layer_count": len(crossed)}
            events.append(dict(event_document(view["step"], "gemm_sqnr_low", details, time=view["time"])))
        below_before = below
        state = {"step": view["step"], "below": sorted(below), "sqnr_min": sqnr_minima(view["tensors"])}
    return events, state
