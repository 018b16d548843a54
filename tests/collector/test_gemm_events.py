"""gemm_sqnr_low: once per episode per layer, on the lower of X's and W's e4m3 SQNR; the state it carries."""

from __future__ import annotations

import math

import numpy as np

from numwatch import protocol
from numwatch.monitor.detectors import gemm_events
from numwatch.monitor.detectors.rules import DetectorConfig

NAMES = ["fc1.weight", "fc1.bias", "fc2.weight"]
NAN = math.nan


def view(step: int, x: list[float], w: list[float]) -> dict:
    tensors = {name: np.full(3, 30.0, np.float32) for name in protocol.GEMM_STATS}
    tensors["gemm_x_e4m3_sqnr"] = np.array(x, np.float32)
    tensors["gemm_w_e4m3_sqnr"] = np.array(w, np.float32)
    tensors["gemm_dy_nvfp4_sqnr"] = np.array([12.0, NAN, 9.5], np.float32)
    return {"step": step, "time": float(step), "tensors": tensors}


def test_fires_when_a_layer_crosses_and_again_only_after_it_recovered() -> None:
    config = DetectorConfig()
    views = [
        view(1, [31, NAN, 30], [31, NAN, 31]),
        view(3, [19.5, NAN, 30], [31, NAN, 31]),  # fc1's input crosses
        view(5, [18, NAN, 30], [31, NAN, 17]),  # fc1 stays below (no event), fc2's weight crosses
        view(7, [25, NAN, 30], [31, NAN, 31]),  # both recover
        view(9, [15, NAN, NAN], [31, NAN, NAN]),  # fc1 again; fc2 not measured (NaN) is not below
    ]
    events, state = gemm_events.detect({}, views, config, NAMES)
    assert [(e["step"], [layer["name"] for layer in e["details"]["layers"]]) for e in events] == [
        (3, ["fc1.weight"]),
        (5, ["fc2.weight"]),
        (9, ["fc1.weight"]),
    ]
    assert events[0]["details"] == {
        "threshold": 20.0,
        "layers": [{"name": "fc1.weight", "index": 0, "sqnr_db": 19.5}],
        "layer_count": 1,
    }
    assert state["step"] == 9 and state["below"] == [0]
    assert state["sqnr_min"]["x:e4m3"] == 15.0 and state["sqnr_min"]["dy:nvfp4"] == 9.5
    assert state["sqnr_min"]["dy:e5m2"] == 30.0


def test_the_state_carries_episodes_across_batches_and_ignores_late_steps() -> None:
    config = DetectorConfig(gemm_sqnr_threshold=25.0)
    events, state = gemm_events.detect({}, [view(2, [20, NAN, 30], [30, NAN, 30])], config, NAMES)
    assert len(events) == 1
    again, state = gemm_events.detect(state, [view(4, [21, NAN, 30], [30, NAN, 30])], config, NAMES)
    assert again == [] and state["step"] == 4
    late, kept = gemm_events.detect(state, [view(3, [10, NAN, 10], [10, NAN, 10])], config, NAMES)
    assert late == [] and kept == state
    steps_without = {"step": 6, "time": 6.0, "tensors": {"grad_norm": np.ones(3, np.float32)}}
    assert gemm_events.detect(state, [steps_without], config, NAMES) == ([], state)


def test_an_exact_layer_is_infinite_not_below_and_minima_skip_nan() -> None:
    _, state = gemm_events.detect({}, [view(1, [math.inf, NAN, 28], [math.inf, NAN, 29])], DetectorConfig(), NAMES)
    assert state["below"] == [] and state["sqnr_min"]["x:e4m3"] == 28.0
    _, state = gemm_events.detect({}, [view(1, [math.inf, NAN, math.inf], [40, NAN, 40])], DetectorConfig(), NAMES)
    assert state["sqnr_min"]["x:e4m3"] == "Infinity"
