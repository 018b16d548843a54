"""Store benchmark: runs of 10k / 50k / 200k steps x 300 tensors, whole-run reads, bytes per step, deletion.

    python benchmarks/store.py [--sizes 10000,50000,200000 --tensors 300 --http-steps 10000 --database both]

For each database (SQLite in a temporary directory; a throwaway PostgreSQL 15 with fsync on,
started as tests/postgres.py does), starts a real collector (``numwatch serve`` on loopback)
and builds one run per size with the hooks' default cadences (format counts every 50 steps,
grad and weight histograms every 100). The first ``--http-steps`` steps of the smallest run
go through the HTTP API (that is the ingest rate printed); the rest goes through the bulk
path: ``store_batch``, the same function the batch endpoint calls, in this process, on the
same database, skipping only HTTP and JSON. Then, per run, through HTTP, median of
``--repeats`` after a warm-up: whole-run series of a global scalar and of one tensor's stat
(max_points 1000), the heatmap, one step, ``/api/v1/runs`` and ``/metrics``; the collector's
peak RSS (VmHWM) after each run's reads. Finally deletes the largest run through the API
while another run ingests over HTTP, and prints that run's worst batch latency and any
refusal, the time until the last row went, and the space handed back.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from benchmarks.documents import batch_document, run_document
from numwatch import protocol
from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.monitor.ingest.batches import store_batch
from numwatch.monitor.ingest.schemas import BatchDocument
from numwatch.monitor.ops import stack
from numwatch.monitor.reads.queries import find_run
from numwatch.monitor.store import db
from numwatch.monitor.store.auth import EVERYTHING
from tests.support.postgres import PostgresUnavailable, postgres_server

BATCH = 64
FORMAT_EVERY, HISTOGRAM_EVERY = 50, 100
JSON = {"Content-Type": "application/json"}
TABLES = (
    "runs",
    "step_blocks",
    "histograms",
    "rollups",
    "forward_stats",
    "events",
    "rank_state",
    "conflicts",
    "run_instances",
)


def stored_bytes(engine: sa.Engine) -> int:
    """Bytes the database uses for numwatch's tables (SQLite: pages in use; PostgreSQL: relations with
    TOAST and indexes)."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            page = connection.exec_driver_sql("PRAGMA page_size").scalar()
            used = (
                connection.exec_driver_sql("PRAGMA page_count").scalar()
                - connection.exec_driver_sql("PRAGMA freelist_count").scalar()
            )
            return page * used
        connection.exec_driver_sql("CHECKPOINT")
        return sum(connection.exec_driver_sql(f"SELECT pg_total_relation_size('{table}')").scalar() for table in TABLES)


def table_bytes(engine: sa.Engine) -> dict[str, int]:
    """Bytes per table (with its indexes; PostgreSQL: and its TOAST)."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.exec_driver_sql(
                "SELECT s.tbl_name, sum(d.pgsize) FROM dbstat AS d JOIN sqlite_master AS s ON d.name = s.name GROUP "
                "BY s.tbl_name"
            ).all()
            return {name: int(size) for name, size in rows if name in TABLES}
        return {
            table: connection.exec_driver_sql(f"SELECT pg_total_relation_size('{table}')").scalar() for table in TABLES
        }


def compacted_bytes(engine: sa.Engine) -> int | None:
    """PostgreSQL after VACUUM FULL: the live rows alone, without the dead versions updates leave until autovacuum."""
    if engine.dialect.name == "sqlite":
        return None
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM FULL")
    return stored_bytes(engine)


def file_bytes(database_url: str) -> int | None:
    path = Path(database_url.removeprefix("sqlite:///"))
    return (
        sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
        if database_url.startswith("sqlite")
        else None
    )


def settle_sqlite_file(engine: sa.Engine, timeout: float = 120) -> None:
    """Wait for the collector's incremental vacuum to hand every free page back, then fold the WAL into
    the file and truncate it, so the file size shows the space given back."""
    deadline = time.monotonic() + timeout
    with engine.connect() as connection:
        while connection.exec_driver_sql("PRAGMA freelist_count").scalar() and time.monotonic() < deadline:
            connection.rollback()
            time.sleep(0.5)
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Batches:
    """Batch documents at the hooks' cadences, drawn from a pool of random 200-step blocks renumbered per use
    (200 is a multiple of both cadences, so every step keeps its format counts and histograms)."""

    BLOCK = 200

    def __init__(self, n_tensors: int, pool: int = 8) -> None:
        rng = np.random.default_rng(0)
        self.n_tensors = n_tensors
        self.steps, self.histograms = [], []
        for _ in range(pool):
            block = batch_document("pool", 1, self.BLOCK, n_tensors, rng, FORMAT_EVERY, HISTOGRAM_EVERY)
            self.steps.append({s["step"]: s for s in block["steps"]})
            histograms: dict[int, list] = {}
            for h in block["histograms"]:
                histograms.setdefault(h["step"], []).append(h)
            self.histograms.append(histograms)

    def document(self, run: str, first: int, steps: int) -> dict:
        out_steps, out_histograms = [], []
        for step in range(first, first + steps):
            block, local = ((step - 1) // self.BLOCK) % len(self.steps), (step - 1) % self.BLOCK + 1
            out_steps.append({**self.steps[block][local], "step": step})
            out_histograms += [{**h, "step": step} for h in self.histograms[block].get(local, [])]
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "run": run,
            "rank": 0,
            "batch_id": f"{run}-{first}",
            "steps": out_steps,
            "histograms": out_histograms,
            "events": [],
            "status": "running",
        }


def build_http(client: httpx.Client, batches: Batches, run: str, first: int, last: int) -> dict:
    bodies = [protocol.dumps(batches.document(run, s, min(BATCH, last - s + 1))) for s in range(first, last + 1, BATCH)]
    latencies = []
    started = time.perf_counter()
    for body in bodies:
        t0 = time.perf_counter()
        client.post(f"/api/v1/runs/{run}/batches", content=body, headers=JSON).raise_for_status()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"steps_per_s": (last - first + 1) / elapsed, "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))]}


def build_bulk(database_url: str, batches: Batches, run: str, first: int, last: int) -> float:
    engine = db.make_engine(database_url)
    started = time.perf_counter()
    with Session(engine) as session:
        for s in range(first, last + 1, BATCH):
            document = BatchDocument.model_validate(
                protocol.loads(protocol.dumps(batches.document(run, s, min(BATCH, last - s + 1))))
            )
            store_batch(session, find_run(session, run, EVERYTHING), document, DetectorConfig())
            session.commit()
    engine.dispose()
    return (last - first + 1) / (time.perf_counter() - started)


def timed(client: httpx.Client, path: str, repeats: int, **params: object) -> float:
    client.get(path, params=params).raise_for_status()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client.get(path, params=params).raise_for_status()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def reads(client: httpx.Client, run: str, steps: int, tensor: str, repeats: int) -> dict[str, float]:
    base = f"/api/v1/runs/{run}"
    return {
        "global series": timed(client, f"{base}/series", repeats, metric="global_grad_norm", max_points=1000),
        "tensor series": timed(client, f"{base}/series", repeats, metric="grad_norm", tensor=tensor, max_points=1000),
        "heatmap": timed(client, f"{base}/heatmap", repeats, stat="grad_norm"),
        "step": timed(client, f"{base}/steps/{steps // 2}", repeats),
        "/api/v1/runs": timed(client, "/api/v1/runs", repeats),
        "/metrics": timed(client, "/metrics", repeats),
    }


def delete_while_ingesting(client: httpx.Client, url: str, database_url: str, batches: Batches, run: str) -> dict:
    """Delete ``run`` through the API while a bystander run posts batches over HTTP."""
    engine = db.make_engine(database_url)
    with engine.connect() as connection:
        run_id = connection.execute(sa.text("SELECT id FROM runs WHERE name = :n"), {"n": run}).scalar()
    before, files_before = stored_bytes(engine), file_bytes(database_url)
    client.post("/api/v1/runs", json=run_document("bystander", batches.n_tensors)).raise_for_status()
    stop, latencies, refusals = threading.Event(), [], []

    def ingest() -> None:
        step = 1
        with httpx.Client(base_url=url, timeout=120) as bystander:
            while not stop.is_set():
                body = protocol.dumps(batches.document("bystander", step, BATCH))
                t0 = time.perf_counter()
                response = bystander.post("/api/v1/runs/bystander/batches", content=body, headers=JSON)
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    refusals.append(response.status_code)
                step += BATCH

    thread = threading.Thread(target=ingest)
    thread.start()
    time.sleep(2)
    started = time.perf_counter()
    response = client.delete(f"/api/v1/runs/{run}")
    if response.status_code != 202:
        raise RuntimeError(f"DELETE answered {response.status_code}: {response.text}")
    with engine.connect() as connection:
        while connection.execute(sa.text("SELECT count(*) FROM runs WHERE id = :id"), {"id": run_id}).scalar():
            time.sleep(0.2)
            connection.rollback()
    elapsed = time.perf_counter() - started
    time.sleep(2)
    stop.set()
    thread.join()
    if engine.dialect.name == "sqlite":
        settle_sqlite_file(engine)
    after, files_after = stored_bytes(engine), file_bytes(database_url)
    engine.dispose()
    return {
        "seconds": elapsed,
        "worst_ms": 1e3 * max(latencies),
        "p50_ms": 1e3 * statistics.median(latencies),
        "batches": len(latencies),
        "refusals": refusals,
        "freed_mb": (before - after) / 1e6,
        "file_mb": None if files_before is None else (files_before / 1e6, files_after / 1e6),
    }


def bench(name: str, database_url: str, workdir: Path, args: argparse.Namespace) -> None:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    batches = Batches(args.tensors)
    tensor = f"layers.{args.tensors // 8}.w1"
    argv = stack.collector_argv(port := stack.free_port(), database_url)
    url = f"http://127.0.0.1:{port}"
    with (
        stack.managed_process(argv, f"{url}/readyz", workdir / "collector.log") as process,
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        rows = []
        for size in args.sizes:
            run = f"store-{size}"
            client.post("/api/v1/runs", json=run_document(run, args.tensors)).raise_for_status()
            before = stored_bytes(engine)
            http_steps = min(size, args.http_steps) if size == args.sizes[0] else 0
            ingest = build_http(client, batches, run, 1, http_steps) if http_steps else None
            bulk = build_bulk(database_url, batches, run, http_steps + 1, size) if size > http_steps else None
            per_step = (stored_bytes(engine) - before) / size
            timings = reads(client, run, size, tensor, args.repeats)
            rows.append((size, ingest, bulk, per_step, timings, peak_rss_mb(process.pid)))
            print(f"{name}: built {run} ({http_steps} steps over HTTP, {size - http_steps} bulk)", flush=True)
        tables = table_bytes(engine)
        compacted = compacted_bytes(engine)
        deletion = delete_while_ingesting(client, url, database_url, batches, f"store-{args.sizes[-1]}")
        peak = peak_rss_mb(process.pid)
    engine.dispose()
    print(f"\n{name}  ({args.tensors} tensors; machine shared with other jobs: timings noisy)")
    header = ["steps", "ingest steps/s", "bytes/step", *rows[0][4], "collector peak RSS"]
    print(" | ".join(header))
    for size, ingest, bulk, per_step, timings, rss in rows:
        ingest_text = (
            f"{ingest['steps_per_s']:.0f} HTTP (p99 {ingest['p99_ms']:.0f} ms)" if ingest else f"{bulk:.0f} bulk"
        )
        print(
            " | ".join(
                [
                    f"{size:,}",
                    ingest_text,
                    f"{per_step:,.0f}",
                    *(f"{v:.0f} ms" for v in timings.values()),
                    f"{rss:.0f} MB",
                ]
            )
        )
    total_steps = sum(args.sizes)
    print(
        "bytes/step by table (all runs): "
        + ", ".join(
            f"{name} {size / total_steps:,.0f}"
            for name, size in sorted(tables.items(), key=lambda item: -item[1])
            if size > 0
        )
    )
    if compacted is not None:
        print(f"after VACUUM FULL (live rows only): {compacted / total_steps:,.0f} bytes/step")
    files = f", file {deletion['file_mb'][0]:.0f} -> {deletion['file_mb'][1]:.0f} MB" if deletion["file_mb"] else ""
    print(
        f"delete {args.sizes[-1]:,}-step run while another run ingests: gone in {deletion['seconds']:.1f} s; "
        f"bystander {deletion['batches']} batches, "
        f"worst {deletion['worst_ms']:.0f} ms, median {deletion['p50_ms']:.0f} ms, refusals "
        f"{deletion['refusals'] or 'none'}; "
        f"stored {deletion['freed_mb']:.0f} MB less (the bystander's new rows included){files}; collector peak RSS "
        f"{peak:.0f} MB",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=lambda text: [int(n) for n in text.split(",")], default=[10_000, 50_000, 200_000]
    )
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument(
        "--http-steps",
        type=int,
        default=10_000,
        help="steps of the smallest run posted over HTTP (the rest: bulk path)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as resources:
        databases = {}
        if args.database in ("sqlite", "both"):
            databases["sqlite"] = f"sqlite:///{Path(tmp) / 'store.db'}"
        if args.database in ("postgresql", "both"):
            try:
                databases["postgresql"] = resources.enter_context(postgres_server(durable=True)).url
            except PostgresUnavailable as reason:
                print(f"postgresql: skipped ({reason})")
        for name, database_url in databases.items():
            workdir = Path(tmp) / name
            workdir.mkdir()
            bench(name, database_url, workdir, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
