"""benchmarks/gpu_check.py where there is no GPU: it refuses clearly, and its verdict logic."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_exits_2_with_a_message() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and not result.stdout


GOOD = {
    "histogram_step_ms": 4.2,
    "format_count_step_ms": 0.7,
    "bf16_defaults_ratio": 1.01,
    "added_syncs": 0,
    "graph_breaks": 0,
    "cuda_tests_failed": 0,
}


def test_every_target_met_passes() -> None:
    gpu_check = _module()
    verdict = gpu_check.evaluate(GOOD)
    assert set(verdict) == set(gpu_check.TARGETS) and all(target["met"] for target in verdict.values())
    line = json.loads(gpu_check.report_line(GOOD, "test machine"))
    assert line["passed"] and line["machine"] == "test machine" and line["measured"] == GOOD


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("histogram_step_ms", 10.0),  # the limit itself is not under it
        ("format_count_step_ms", 2.5),
        ("bf16_defaults_ratio", 1.031),
        ("added_syncs", 1),
        ("graph_breaks", 2),
        ("cuda_tests_failed", 1),
        ("histogram_step_ms", None),  # not measured: not met
    ],
)
def test_a_missed_target_fails(key: str, value: float | None) -> None:
    gpu_check = _module()
    measured = {**GOOD, key: value}
    if value is None:
        del measured[key]
    line = json.loads(gpu_check.report_line(measured, "test machine"))
    assert not line["passed"]
    assert [name for name, target in line["targets"].items() if not target["met"]] == [
        name for name, (measurement, _, _) in gpu_check.TARGETS.items() if measurement == key
    ]


def test_the_bf16_limit_is_inclusive() -> None:
    assert _module().evaluate({**GOOD, "bf16_defaults_ratio": 1.03})["bf16 defaults"]["met"]
