"""The alert rules: promtool's own checks and unit tests, plus the conventions every rule follows."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.binaries import require_binary
from tests.support.metrics_contract import sample_exposition, unknown_metric_names
from tests.support.promstack import (
    alertmanager_alerts,
    running_alertmanager,
    running_prometheus,
    serving_metrics,
    wait_for,
)

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"
RULES = RULES_DIR / "numwatch.rules.yml"
RULE_TESTS = RULES_DIR / "numwatch.rules.test.yml"

EXPECTED_ALERTS = {
    "NumwatchNonFiniteGradients",
    "NumwatchNonFiniteLoss",
    "NumwatchGradientExplosion",
    "NumwatchLossScaleCollapse",
    "NumwatchSkippedStepRateHigh",
    "NumwatchUnderflowHigh",
    "NumwatchVanishingGradients",
    "NumwatchSpikeRateHigh",
    "NumwatchAttentionLogitHigh",
    "NumwatchRankNonFinite",
    "NumwatchStraggler",
    "NumwatchReplicaDivergence",
    "NumwatchGemmSqnrLow",
    "NumwatchRunStalled",
    "NumwatchCollectorDown",
    "NumwatchCollectorRejectingBatches",
}


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=RULES_DIR)


@pytest.mark.binaries
def test_promtool_check_rules() -> None:
    result = _run(require_binary("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


@pytest.mark.binaries
def test_promtool_unit_tests_pass() -> None:
    result = _run(require_binary("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_expected_alert_is_defined_once() -> None:
    names = [rule["alert"] for rule in _alert_rules()]
    assert sorted(names) == sorted(EXPECTED_ALERTS)


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_rule_conventions(rule: dict) -> None:
    assert "for" in rule, "every alert states how long its condition must hold"
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert {"summary", "description", "dashboard"} <= set(annotations)
    assert "$value" in annotations["description"]
    assert "/d/numwatch-" in annotations["dashboard"]
    if "$labels.run" in annotations["summary"]:
        assert annotations["dashboard"].endswith("/d/numwatch-run/numwatch-run?var-run={{ $labels.run }}")
    else:
        assert annotations["dashboard"].endswith("/d/numwatch-overview/numwatch-overview")
    assert not unknown_metric_names(rule["expr"])


@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda rule: rule["alert"])
def test_run_level_series_are_deduplicated_across_replicas(rule: dict) -> None:
    """Replicas expose identical run series, so those rules aggregate instance away."""
    expr = rule["expr"]
    if "up{" in expr:
        return  # per-target by design: one replica down is worth an alert
    assert "without(instance)" in expr


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases = [case for group in tests for case in group["alert_rule_test"]]
    for name in EXPECTED_ALERTS:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never expected to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{name} has no case where it must stay silent"


ALERT_ARRIVAL_TIMEOUT_S = 60.0


@pytest.mark.binaries
@pytest.mark.slow
def test_nan_alert_reaches_real_alertmanager(tmp_path: Path) -> None:
    """Static /metrics with a NaN-step counter > 0 → real Prometheus with the real rules →
    real Alertmanager: the NaN alert arrives with the run label, and no explosion alert."""
    run = "e2e-fp16-run"
    with (
        serving_metrics(sample_exposition(run, now=time.time(), nonfinite_steps=2)) as target,
        running_alertmanager(tmp_path) as alertmanager,
        running_prometheus(tmp_path, target, alertmanager=alertmanager),
    ):

        def nan_alerts() -> list[dict]:
            alerts = alertmanager_alerts(alertmanager)
            return [alert for alert in alerts if alert["labels"]["alertname"] == "NumwatchNonFiniteGradients"]

        arrived = wait_for(nan_alerts, ALERT_ARRIVAL_TIMEOUT_S)
        assert arrived, f"no NaN alert within {ALERT_ARRIVAL_TIMEOUT_S}s"
        (alert,) = arrived
        assert alert["labels"]["run"] == run
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["dashboard"].endswith(f"/d/numwatch-run/numwatch-run?var-run={run}")
        names = {alert["labels"]["alertname"] for alert in alertmanager_alerts(alertmanager)}
        assert "NumwatchGradientExplosion" not in names
        assert "NumwatchNonFiniteLoss" not in names
