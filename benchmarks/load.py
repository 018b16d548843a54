"""Load benchmark: many training runs streaming into one collector at once.

    python benchmarks/load.py [--clients 32] [--seconds 60] [--database sqlite|postgresql|both]

For each database, starts one real collector (``numwatch serve`` on a loopback port; SQLite
in a temporary directory, or a throwaway PostgreSQL with fsync on), then ``--clients`` client
processes (multiprocessing, spawn), each registering its own run of ``--tensors`` tensors and
posting ``--steps-per-batch``-step batches (format counts and histograms at the hooks'
cadences) as fast as the collector answers. Prints a progress line while it runs, then a
table: batches acknowledged, errors by status code or exception, throughput (batches/s,
steps/s, per-tensor values/s) and p50/p99/max batch latency. Finally checks, in the database
and through the read API, that every acknowledged step is stored exactly once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.* from a checkout

from benchmarks.load_client import ClientPlan, ClientReport, run_client  # noqa: E402
from numwatch.monitor import db, stack, step_blocks  # noqa: E402
from numwatch.monitor.store.models import RankState, Run  # noqa: E402
from tests.support.postgres import PostgresUnavailable, postgres_server  # noqa: E402

PROGRESS_EVERY_S = 5.0
RESULT_TIMEOUT_S = 300.0  # after the run: for the slowest client's last answer and report


@dataclass
class LoadResult:
    database: str
    clients: int
    seconds: float
    reports: list[ClientReport]

    @property
    def latencies_ms(self) -> np.ndarray:
        return 1e3 * np.sort(np.concatenate([np.asarray(r.latencies_s, dtype=np.float64) for r in self.reports]))

    @property
    def errors(self) -> Counter:
        return sum((r.errors for r in self.reports), Counter())

    def total(self, attribute: str) -> int:
        return sum(getattr(r, attribute) for r in self.reports)


@contextmanager
def database_url(kind: str, workdir: Path) -> Iterator[str]:
    """A migrated, empty database of ``kind``: a SQLite file, or a fresh durable PostgreSQL."""
    if kind == "sqlite":
        url = f"sqlite:///{workdir / 'load.db'}"
        db.upgrade(url)
        yield url
        return
    with postgres_server(workdir / "postgres", durable=True) as server:
        url = server.url
        db.upgrade(url)
        yield url


def run_load(url: str, database: str, args: argparse.Namespace) -> LoadResult:
    """Start the clients, print progress until they finish, collect their reports."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(args.clients + 1)
    progress = context.Value("q", 0)
    results = context.Queue()
    plans = [
        ClientPlan(
            url=url,
            run=f"load-{database}-{i:03d}",
            seed=i,
            seconds=args.seconds,
            n_tensors=args.tensors,
            steps_per_batch=args.steps_per_batch,
            format_every=args.format_every,
            histogram_every=args.histogram_every,
        )
        for i in range(args.clients)
    ]
    processes = [
        context.Process(target=run_client, args=(plan, ready, progress, results), daemon=True) for plan in plans
    ]
    for process in processes:
        process.start()
    reports: list[ClientReport] = []
    try:
        ready.wait(timeout=120)  # every client registered and built its payloads
        started = time.time()
        last_count, last_time = 0, time.monotonic()
        while len(reports) < len(plans):
            try:
                reports.append(results.get(timeout=PROGRESS_EVERY_S))
                continue
            except queue.Empty:
                pass
            if time.time() - started > args.seconds + RESULT_TIMEOUT_S:
                raise RuntimeError(f"only {len(reports)} of {len(plans)} clients reported")
            if not any(p.is_alive() for p in processes) and results.empty():
                raise RuntimeError(f"clients exited without reporting ({len(reports)} of {len(plans)} reported)")
            now, count = time.monotonic(), progress.value
            print(
                f"  {database:<10} {time.time() - started:6.1f} s  {count:7d} batches  "
                f"{(count - last_count) / (now - last_time):7.1f} batches/s now",
                flush=True,
            )
            last_count, last_time = count, now
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    elapsed = max(r.finished_at for r in reports) - min(r.started_at for r in reports)
    return LoadResult(database, args.clients, elapsed, reports)


def print_table(result: LoadResult, steps_per_batch: int) -> None:
    latencies = result.latencies_ms
    batches, seconds = result.total("batches_ok"), result.seconds
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(result.errors.items())) or "none"
    rows = [
        ("database", result.database),
        ("clients (processes)", str(result.clients)),
        ("duration", f"{seconds:.1f} s"),
        ("batches ok", f"{batches}  ({steps_per_batch} steps each)"),
        ("errors", errors),
        (
            "throughput",
            f"{batches / seconds:.1f} batches/s  {result.total('acknowledged_steps') / seconds:,.0f} steps/s  "
            f"{result.total('values') / seconds / 1e6:.2f} M per-tensor values/s",
        ),
        (
            "batch latency",
            f"p50 {np.percentile(latencies, 50):.0f} ms  p99 {np.percentile(latencies, 99):.0f} ms  max "
            f"{latencies[-1]:.0f} ms"
            if len(latencies)
            else "no batch acknowledged",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"  {name:<{width}}  {value}" for name, value in rows), flush=True)


def verify_exactly_once(url: str, database: str, result: LoadResult) -> list[str]:
    """Problems found comparing each run's stored steps with its acknowledged steps (none: all good).

    Steps 1..n of a run are acknowledged in order, so exactly-once means: n rows, numbered 1..n,
    and the read API's steps_total is n too. A batch whose last attempt got no answer may or may
    not be stored; it is allowed either way.
    """
    engine = db.make_engine(database)
    try:
        with Session(engine) as session:
            stored = {}
            for run in session.execute(select(Run)).scalars():
                ranks = session.execute(select(RankState.rank).where(RankState.run_id == run.id)).scalars()
                numbers = [
                    step["step"]
                    for rank in ranks
                    for step in step_blocks.Reader(session, run.id, rank, len(run.tensors)).range(wanted=())
                ]
                if numbers:
                    stored[run.name] = (len(numbers), len(set(numbers)), min(numbers), max(numbers))
    finally:
        engine.dispose()
    api = {
        run["run"]: run["steps_total"] for run in httpx.get(f"{url}/api/v1/runs", timeout=60).raise_for_status().json()
    }
    problems = []
    for report in result.reports:
        acknowledged = report.acknowledged_steps
        rows, distinct, first, last = stored.get(report.run, (0, 0, None, None))
        allowed = {acknowledged, acknowledged + report.in_doubt_steps}
        if (
            rows not in allowed
            or distinct != rows
            or (rows and (first, last) != (1, rows))
            or api.get(report.run) != rows
        ):
            problems.append(
                f"{report.run}: acknowledged {acknowledged} (+{report.in_doubt_steps} in doubt), stored {rows} rows "
                f"({distinct} distinct, steps {first}..{last}), read API steps_total {api.get(report.run)}"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--tensors", type=int, default=200, help="tensors per run")
    parser.add_argument("--steps-per-batch", type=int, default=64)
    parser.add_argument("--format-every", type=int, default=50, help="steps between format counts (the hooks' default)")
    parser.add_argument(
        "--histogram-every", type=int, default=256, help="steps between grad+weight histograms (every 4th batch)"
    )
    args = parser.parse_args(argv)

    databases = ("sqlite", "postgresql") if args.database == "both" else (args.database,)
    print(
        f"{args.clients} client processes x {args.seconds:g} s; runs of {args.tensors} tensors, "
        f"{args.steps_per_batch}-step batches, "
        f"format counts every {args.format_every} steps, histograms every {args.histogram_every}; machine: "
        f"{os.cpu_count()} CPU cores"
    )
    failed = False
    for database in databases:
        # Under the system temp dir: PostgreSQL's unprivileged user must reach its directory.
        with tempfile.TemporaryDirectory(prefix="numwatch-load-") as tmp, ExitStack() as resources:
            workdir = Path(tmp)
            os.chmod(workdir, 0o755)
            try:
                address = resources.enter_context(database_url(database, workdir))
            except PostgresUnavailable as reason:
                print(f"{database}: skipped ({reason})")
                continue
            url = resources.enter_context(stack.running_collector(workdir / "collector", address))
            result = run_load(url, database, args)
            print_table(result, args.steps_per_batch)
            problems = verify_exactly_once(url, address, result)
        if problems:
            failed = True
            print(f"  exactly once: FAILED for {len(problems)} runs:\n    " + "\n    ".join(problems))
        else:
            print(
                f"  exactly once: OK, {result.total('acknowledged_steps'):,} acknowledged steps of "
                f"{len(result.reports)} runs "
                "each stored once (database rows and read API steps_total)",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
