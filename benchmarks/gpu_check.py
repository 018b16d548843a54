"""The GPU check: everything about numwatch that only a CUDA device can show, in one command.

    python benchmarks/gpu_check.py [--steps 100]

On one CUDA device (about 5 minutes on an H100), in order:

1. ``pytest tests/client/test_cuda.py``: the statistics on CUDA against float64 references.
2. Host syncs: every kind of watched step (tests/support/step_kinds.py) unwatched and
   watched, under ``torch.cuda.set_sync_debug_mode("warn")`` and numwatch's sync recorder;
   the watched run may not sync more than the unwatched one.
3. Overhead on CUDA (benchmarks/overhead.py's paired steps, d_model 1024, 8 layers): the
   time a histogram step and a format-count step add, and the defaults' mean ratio under
   bf16 autocast (fp32 too, reported).
4. A compiled run (inductor, ``fullgraph=True``, watched before compiling): graph breaks
   and compiled frames against the same run unwatched.

Prints one JSON line: every measurement, the targets (histogram step < 10 ms, format-count
step < 2 ms, bf16 defaults <= 1.03x, zero added syncs, zero graph breaks) and whether each
was met; exits 0 when all were, 1 otherwise, 2 (with a message) without CUDA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = 2

# name: (measurement, comparison, limit)
TARGETS: dict[str, tuple[str, str, float]] = {
    "histogram step": ("histogram_step_ms", "<", 10.0),
    "format-count step": ("format_count_step_ms", "<", 2.0),
    "bf16 defaults": ("bf16_defaults_ratio", "<=", 1.03),
    "added syncs": ("added_syncs", "==", 0),
    "graph breaks": ("graph_breaks", "==", 0),
    "cuda tests": ("cuda_tests_failed", "==", 0),
}


def evaluate(measured: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its measured value and whether it was met (a missing value is not)."""
    results = {}
    for name, (key, comparison, limit) in TARGETS.items():
        value = measured.get(key)
        met = value is not None and (
            value < limit if comparison == "<" else value <= limit if comparison == "<=" else value == limit
        )
        results[name] = {"measured": value, "target": f"{comparison} {limit}", "met": bool(met)}
    return results


def report_line(measured: dict[str, Any], machine: str) -> str:
    """The one JSON line printed at the end."""
    targets = evaluate(measured)
    return json.dumps(
        {
            "check": "numwatch-gpu",
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine,
            "passed": all(t["met"] for t in targets.values()),
            "targets": targets,
            "measured": measured,
        },
        sort_keys=True,
    )


def require_cuda() -> Any:
    """torch, when a CUDA device is there; else exit 2 with a message."""
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        raise SystemExit(NO_CUDA)
    return torch


def cuda_tests() -> int:
    """Failures (or errors) of tests/client/test_cuda.py; every test must run, none skip."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/client/test_cuda.py", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(result.stdout[-3000:], file=sys.stderr)
    return 0 if result.returncode == 0 and " skipped" not in result.stdout else 1


def added_syncs(device: Any) -> tuple[int, dict[str, list[str]]]:
    """Syncs the watched run adds, per kind of step."""
    from tests.support.step_kinds import LOOPS, added, record

    found = {}
    with tempfile.TemporaryDirectory() as spool:
        for kind, build in LOOPS.items():
            baseline = record(build, device, None)
            watched = record(build, device, Path(spool, kind.replace(" ", "-").replace(",", "")))
            extra = added(baseline, watched)
            if extra:
                found[kind] = extra
    return sum(len(syncs) for syncs in found.values()), found


def overhead(
    device: Any, steps: int, d_model: int = 1024, layers: int = 8, context: int = 256, batch: int = 16
) -> dict[str, float]:
    """benchmarks/overhead.py's paired steps (d_model 1024 x 8 layers on the GPU)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import overhead as bench

    args = argparse.Namespace(
        device=device.type,
        d_model=d_model,
        layers=[layers],
        context=context,
        steps=steps,
        uniform_steps=max(10, steps // 4),
    )
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as spool:
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            defaults = bench.measure({}, dtype, batch, args, spool)
            results[f"{precision}_defaults_ratio"] = defaults["mean"]
            if precision == "bf16":
                histogram = bench.measure({"histogram_every": 1}, dtype, batch, args, spool)
                formats = bench.measure({"format_every": 1, "histogram_every": 0}, dtype, batch, args, spool)
                results["histogram_step_ms"] = histogram["watched_ms"] - histogram["base_ms"]
                results["format_count_step_ms"] = formats["watched_ms"] - formats["base_ms"]
                results["bf16_step_ms"] = defaults["base_ms"]
    return results


def compiled(device: Any, d: int = 128, layers: int = 4) -> dict[str, Any]:
    """Graph breaks and compiled frames, watched (before compiling) and not, fullgraph=True."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    import numwatch
    from tests.support.nanogpt import NanoGPT

    results: dict[str, Any] = {}
    for watched in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = NanoGPT(vocab=256, d=d, heads=4, layers=layers, context=64).to(device).train(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with tempfile.TemporaryDirectory() as spool:
            watcher = numwatch.watch(model, optimizer, spool_dir=spool, histogram_every=3) if watched else None
            counter = CompileCounterWithBackend("inductor")
            run = torch.compile(model, backend=counter, fullgraph=True)
            for _ in range(5):
                tokens = torch.randint(0, 256, (4, 65), device=device)
                _, loss = run(tokens[:, :-1], tokens[:, 1:].contiguous())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            if watcher is not None:
                watcher.close()
        label = "watched" if watched else "unwatched"
        results[f"{label}_frames"] = counter.frame_count
        results[f"{label}_graph_breaks"] = sum(counters["graph_break"].values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="paired steps per overhead configuration")
    args = parser.parse_args()
    torch = require_cuda()
    sys.path.insert(0, str(ROOT))
    machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    started = time.monotonic()
    measured: dict[str, Any] = {}
    measured["cuda_tests_failed"] = cuda_tests()
    cuda = torch.device("cuda")
    measured["added_syncs"], measured["syncs_by_step_kind"] = added_syncs(cuda)
    measured.update(overhead(cuda, args.steps))
    compile_counts = compiled(cuda)
    measured.update(compile_counts)
    measured["graph_breaks"] = compile_counts["watched_graph_breaks"] - compile_counts["unwatched_graph_breaks"]
    measured["extra_compiled_frames"] = compile_counts["watched_frames"] - compile_counts["unwatched_frames"]
    measured["seconds"] = round(time.monotonic() - started, 1)
    line = report_line(measured, machine)
    print(line)
    raise SystemExit(0 if json.loads(line)["passed"] else 1)


if __name__ == "__main__":
    main()
