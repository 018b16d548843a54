"""Each detector on a synthetic stream where it must fire at an exact step, and one where it must not."""

from __future__ import annotations

import numpy as np
import pytest

from numwatch.monitor.detectors.rules import DetectorConfig, detect

CONFIG = DetectorConfig(
    explosion_factor=10.0,
    window=20,
    min_history=5,
    vanishing_floor=1e-10,
    underflow_threshold=0.01,
    collapse_floor=1.0,
    collapse_backoffs=3,
)
NUMEL = np.array([100.0, 100.0])


def view(
    step: int,
    norm: float = 1.0,
    tensor_norms=(0.5, 0.5),
    loss: float = 1.0,
    scale: float = 1024.0,
    decision: str = "none",
    skipped: bool = False,
    underflow=None,
) -> dict:
    tensors = {
        "grad_norm": np.array(tensor_norms, dtype=np.float32),
        "nan_count": np.zeros(2, np.int64),
        "inf_count": np.zeros(2, np.int64),
    }
    if underflow is not None:
        tensors.update(
            zeros=np.zeros(2, np.int64),
            underflow=np.array(underflow, np.int64),
            subnormal=np.zeros(2, np.int64),
            overflow=np.zeros(2, np.int64),
        )
    return {
        "step": step,
        "time": float(step),
        "loss": loss,
        "loss_scale": scale,
        "new_loss_scale": scale,
        "global_grad_norm": norm,
        "headroom_bits": 3.0,
        "scale_decision": decision,
        "skipped": skipped,
        "tensors": tensors,
    }


def kinds_at(events: list[dict], kind: str) -> list[int]:
    return [e["step"] for e in events if e["kind"] == kind]


def run_stream(views: list[dict], split: int = 0) -> list[dict]:
    """Detect over ``views`` fed in two batches (history = the first ``split``), as ingest does."""
    events = detect([], views[:split], CONFIG, ["a", "b"], NUMEL) if split else []
    return events + detect(views[:split][-CONFIG.window :], views[split:], CONFIG, ["a", "b"], NUMEL)


@pytest.mark.parametrize("split", [0, 13, 29])
def test_explosion_fires_at_the_spike_only(split: int) -> None:
    rng = np.random.default_rng(0)
    views = [view(s, norm=float(rng.uniform(0.8, 1.2))) for s in range(1, 41)]
    views[29]["global_grad_norm"] = 12.5  # step 30: > 10x the rolling median (~1)
    assert kinds_at(run_stream(views, split), "grad_explosion") == [30]


def test_explosion_silent_on_steady_growth_and_early_steps() -> None:
    views = [view(s, norm=1.15**s) for s in range(1, 60)]  # grows 15%/step: never 10x its window median at once
    views[1]["global_grad_norm"] = 50.0  # step 2: a spike before min_history is not judged
    assert kinds_at(run_stream(views), "grad_explosion") == []


def test_vanishing_fires_once_when_the_streak_reaches_the_window() -> None:
    views = [view(s, tensor_norms=(0.5, 1e-12 if s >= 11 else 0.5)) for s in range(1, 60)]
    events = run_stream(views, split=25)
    assert kinds_at(events, "vanishing_grad") == [11 + CONFIG.window - 1]
    assert events[[e["kind"] for e in events].index("vanishing_grad")]["details"]["tensors"] == ["b"]


def test_vanishing_silent_when_the_streak_breaks() -> None:
    views = [view(s, tensor_norms=(0.5, 0.0 if s % 15 else 0.5)) for s in range(1, 60)]
    assert kinds_at(run_stream(views), "vanishing_grad") == []


def test_underflow_high_fires_at_episode_start() -> None:
    views = [view(s, underflow=[0, 1] if s < 8 else [5, 5]) for s in range(1, 20)]  # 0.5% then 5%
    assert kinds_at(run_stream(views, split=4), "underflow_high") == [8]


def test_underflow_silent_below_threshold() -> None:
    views = [view(s, underflow=[1, 1]) for s in range(1, 20)]  # exactly 1%: not above
    assert kinds_at(run_stream(views), "underflow_high") == []


def test_collapse_on_backoff_burst_and_on_floor() -> None:
    views = [view(s) for s in range(1, 30)]
    for s in (10, 11, 12, 13):  # the 4th backoff within the window is more than 3
        views[s - 1].update(scale_decision="backoff", skipped=True)
    views[24].update(new_loss_scale=0.5)
    events = run_stream(views, split=11)
    assert kinds_at(events, "loss_scale_collapse") == [13]
    assert kinds_at(events, "loss_scale_backoff") == [10, 11, 12, 13] and kinds_at(events, "skipped_step") == [
        10,
        11,
        12,
        13,
    ]
    below = [view(s, scale=0.5 if s >= 5 else 2.0) for s in range(1, 10)]
    assert kinds_at(run_stream(below), "loss_scale_collapse") == [5]


def test_collapse_silent_on_occasional_backoffs() -> None:
    views = [
        view(s, decision="backoff" if s % 10 == 0 else ("growth" if s % 10 == 5 else "none")) for s in range(1, 80)
    ]
    events = run_stream(views, split=40)
    assert kinds_at(events, "loss_scale_collapse") == []
    assert kinds_at(events, "loss_scale_growth") == list(range(5, 80, 10))


def test_nonfinite_names_first_tensors_and_loss() -> None:
    views = [view(s) for s in range(1, 6)]
    views[3]["tensors"]["nan_count"] = np.array([0, 7])
    views[3]["loss"] = float("nan")
    events = run_stream(views)
    assert kinds_at(events, "nonfinite_grad") == [4] and kinds_at(events, "nonfinite_loss") == [4]
    assert events[0]["details"]["tensors"] == [{"index": 1, "name": "b", "nan": 7, "inf": 0}]
