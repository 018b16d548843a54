"""Events from the forward-pass statistics of sampled steps (pure functions over stored rows).

``attention_logit_growth``: an attention call's max logit is above the threshold (or NaN) at
a measured step and was not at the call's previous measurement: once per episode, naming
every call that crossed at that step. ``log_z_drift``: the mean output log Z left the band
(or is NaN) and was inside it at the previous measurement. A row is a dict with the
``forward_stats`` columns (floats decoded).
"""

from __future__ import annotations

import math
from typing import Any

from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.protocol import decode_float, encode_float, event_document


def _above(value: float | None, threshold: float) -> bool:
    return value is not None and (math.isnan(value) or value > threshold)


def _outside(value: float | None, config: DetectorConfig) -> bool:
    return value is not None and not config.log_z_low <= value <= config.log_z_high


def attention_maxima(row: dict[str, Any]) -> dict[str, float]:
    """The row's max logit per attention call (decoded floats), forward order."""
    return {
        name: decode_float(value)
        for name, value in zip(row["attention_calls"], row["attention_logit_max"], strict=True)
    }


def detect(
    previous: dict[str, Any] | None, rows: list[dict[str, Any]], config: DetectorConfig, times: dict[int, float]
) -> list[dict[str, Any]]:
    """Events of ``rows`` (ascending steps), judged after ``previous`` (the stored row before them)."""
    events = []
    last_attention = attention_maxima(previous) if previous is not None else {}
    last_log_z = previous["log_z_mean"] if previous is not None else None
    threshold = config.attention_logit_threshold
    for row in rows:
        maxima = attention_maxima(row)
        crossed = [
            name
            for name, value in maxima.items()
            if _above(value, threshold) and not _above(last_attention.get(name), threshold)
        ]
        if crossed:
            details = {
                "threshold": threshold,
                "layers": [{"name": name, "value": encode_float(maxima[name])} for name in crossed],
            }
            events.append(dict(event_document(row["step"], "attention_logit_growth", details, time=times[row["step"]])))
        last_attention.update(maxima)
        log_z = row["log_z_mean"]
        if _outside(log_z, config) and not _outside(last_log_z, config):
            details = {
                "log_z_mean": encode_float(log_z),
                "log_z_max": encode_float(row["log_z_max"]),
                "low": config.log_z_low,
                "high": config.log_z_high,
            }
            events.append(dict(event_document(row["step"], "log_z_drift", details, time=times[row["step"]])))
        if log_z is not None:
            last_log_z = log_z
    return events
