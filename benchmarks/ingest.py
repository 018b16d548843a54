"""Collector ingest benchmark: sustained batches of a 1,000-tensor model, and /metrics render time.

    python benchmarks/ingest.py [--tensors 1000 --steps-per-batch 64 --batches 40 --runs 100]

Starts real collectors (``numwatch serve`` subprocesses on loopback) on SQLite and, when
PostgreSQL's server binaries are on the machine, on a throwaway PostgreSQL, posts realistic
batches over HTTP and prints per-tensor values/s and p50/p99 latency per batch. Then
registers ``--runs`` live runs of ``--tensors`` tensors and times ``GET /metrics``.
Targets on the 2-core reference machine: ≥ 1,000,000 values/s into SQLite, p99 < 50 ms for a
64-step batch, /metrics < 250 ms with 100 runs × 1,000 tensors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.* from a checkout

from benchmarks.documents import batch_document, run_document, values_in  # noqa: E402
from numwatch import protocol  # noqa: E402
from numwatch.monitor import db, stack  # noqa: E402
from tests.support.postgres import PostgresUnavailable, postgres_server  # noqa: E402


def bench_ingest(url: str, args: argparse.Namespace) -> dict:
    """Post ``args.batches`` batches sequentially; values/s and latency percentiles."""
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=60) as client:
        client.post("/api/v1/runs", json=run_document("ingest", args.tensors)).raise_for_status()
        # Built (and encoded) up front: the benchmark measures the collector, not the generator.
        batches = [
            protocol.dumps(
                batch_document(
                    "ingest", 1 + i * args.steps_per_batch, args.steps_per_batch, args.tensors, rng, args.format_every
                )
            )
            for i in range(args.batches)
        ]
        values = sum(values_in(protocol.loads(body), args.tensors) for body in batches)
        latencies = []
        started = time.perf_counter()
        for body in batches:
            t0 = time.perf_counter()
            response = client.post(
                "/api/v1/runs/ingest/batches", content=body, headers={"Content-Type": "application/json"}
            )
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "values_per_s": values / elapsed,
        "steps_per_s": args.batches * args.steps_per_batch / elapsed,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def bench_metrics(url: str, args: argparse.Namespace) -> dict:
    """``args.runs`` live runs of ``args.tensors`` tensors, a few steps each; GET /metrics timings."""
    rng = np.random.default_rng(1)
    with httpx.Client(base_url=url, timeout=60) as client:
        for r in range(args.runs):
            run = f"live-{r:03d}"
            client.post("/api/v1/runs", json=run_document(run, args.tensors)).raise_for_status()
            client.post(
                f"/api/v1/runs/{run}/batches",
                content=protocol.dumps(batch_document(run, 1, 2, args.tensors, rng, 1)),
                headers={"Content-Type": "application/json"},
            ).raise_for_status()
        timings = []
        for _ in range(args.scrapes):
            time.sleep(args.metrics_cache_s)  # past the exposition's cache: every scrape renders
            t0 = time.perf_counter()
            response = client.get("/metrics")
            timings.append(time.perf_counter() - t0)
            response.raise_for_status()
        series = sum(1 for line in response.text.splitlines() if line and not line.startswith("#"))
    return {"median_ms": 1e3 * statistics.median(timings), "max_ms": 1e3 * max(timings), "series": series}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--steps-per-batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--format-every", type=int, default=50, help="steps between format counts (the hooks' default)")
    parser.add_argument("--runs", type=int, default=100, help="live runs for the /metrics timing")
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument(
        "--metrics-cache-s", type=float, default=1.1, help="wait between scrapes (the exposition caches for 1 s)"
    )
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as resources:
        databases = {"sqlite": f"sqlite:///{Path(tmp) / 'bench.db'}"}
        if not args.no_postgres:
            try:
                databases["postgresql"] = resources.enter_context(postgres_server(durable=True)).url
            except PostgresUnavailable as reason:
                print(f"postgresql: skipped ({reason})")
        print(
            f"{args.tensors} tensors, {args.steps_per_batch}-step batches, {args.batches} batches, format counts "
            f"every {args.format_every} steps"
        )
        for name, database_url in databases.items():
            workdir = Path(tmp) / name
            workdir.mkdir()
            db.upgrade(database_url)  # PostgreSQL is not migrated implicitly (SQLite would be)
            with stack.running_collector(workdir, database_url) as url:
                result = bench_ingest(url, args)
                print(
                    f"ingest {name:<10} {result['values_per_s'] / 1e6:6.2f} M values/s  {result['steps_per_s']:7.0f} "
                    "steps/s  "
                    f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms per batch",
                    flush=True,
                )
                if name == "sqlite":
                    metrics = bench_metrics(url, args)
                    print(
                        f"/metrics   {args.runs} runs x {args.tensors} tensors: median {metrics['median_ms']:.0f} ms, "
                        f"max {metrics['max_ms']:.0f} ms, {metrics['series']} series"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
