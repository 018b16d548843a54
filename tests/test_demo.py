"""`numwatch demo` end to end, shortened: a real collector detects the instability it provokes, in order."""

from __future__ import annotations

import io

from numwatch.monitor.demo import DemoPlan, run_demo


def test_demo_detects_explosion_before_nan_and_names_the_origin() -> None:
    out = io.StringIO()
    events = run_demo(plan=DemoPlan(steps=90, spike_at=40, ramp_steps=30), out=out)
    first = {}
    for event in sorted(events, key=lambda e: e["step"]):
        first.setdefault(event["kind"], event["step"])
    assert {"grad_explosion", "nonfinite_origin", "nonfinite_loss", "loss_scale_backoff", "skipped_step"} <= set(first)
    assert 40 < first["grad_explosion"] < first["nonfinite_loss"] <= 90
    assert first["nonfinite_origin"] == first["nonfinite_grad"]
    assert "The collector detected" in out.getvalue() and "grad_explosion" in out.getvalue()
