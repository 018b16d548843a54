"""A simulated large job against the real collector on PostgreSQL: many ranks, one step per second each.

    python benchmarks/ranks_sim.py [--ranks 512] [--seconds 180] [--tensors 100] [--sampled-every 10] [--replicas 1]

Starts a throwaway PostgreSQL (durable: fsync on) and one real collector (``numwatch serve`` on a
loopback port, ``NUMWATCH_METRICS_CACHE_SECONDS=0`` so every scrape builds /metrics; ``--replicas N``:
N of them on the one database, rank r sending to the (r mod N)-th), registers one run of ``--ranks``
ranks and, for ``--seconds``, makes every rank produce one step per second (the ranks spread over
each second). Each rank sends like the client's transport, on a connection of its own: what is due,
at most 64 steps a batch, at most one batch a second, waiting for each answer (so a slow collector
gets fewer, larger batches). Rank 0's steps carry the replicated statistics of ``--tensors`` tensors
(norms, abs-max, NaN/Inf counts) and its local health; every other rank's its loss, step time and
local health with ``replicated_by=0``; sampled steps add the replicas' checksum. Prints steps and
batches acknowledged, ingest latency per batch (p50/p99/max), stored bytes per step (step blocks,
rollups, the tables on disk), how far the cross-rank judging got, and /metrics scrape time with
all ranks (every ``SCRAPE_EVERY_S`` during the run, three times after).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path

import httpx
import numpy as np
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support from a checkout

from numwatch import protocol  # noqa: E402
from numwatch.monitor.ops import stack  # noqa: E402
from numwatch.monitor.store import db  # noqa: E402
from tests.support.postgres import postgres_server  # noqa: E402

RUN = "ranks-sim"
SCRAPE_EVERY_S = 10.0
JSON = {"Content-Type": "application/json"}
BATCH_STEPS, BATCH_SECONDS = 64, 1.0  # numwatch.delivery.transport's


def _tensors(n: int) -> list[protocol.TensorSpec]:
    return [{"name": f"layer{i}.weight", "shape": [1024, 1024], "dtype": "bfloat16", "group": 0} for i in range(n)]


def _array(values: np.ndarray, dtype: str) -> str:
    return protocol.pack_bytes(np.ascontiguousarray(values, dtype=dtype).tobytes())


def step_document(rank: int, step: int, n_tensors: int, sampled: bool, rng: np.random.Generator) -> dict:
    """Rank ``rank``'s step ``step`` as a client at one step per second sends it."""
    local = protocol.local_health(
        float(rng.lognormal(0.0, 0.1)),
        0,
        compute_time=round(float(rng.normal(0.8, 0.01)), 6),
        nonfinite_tensors=[] if sampled else None,
        checksum=123456789 if sampled else None,
    )
    common = {"time": time.time(), "step_time": 1.0, "loss": float(rng.normal(2.0, 0.05)), "local": local}
    if rank:
        return dict(protocol.step_document(step, tensors={}, replicated_by=0, **common))
    norms = rng.lognormal(-3.0, 0.5, n_tensors).astype(np.float32)
    tensors = {
        "grad_norm": _array(norms, "<f4"),
        "grad_absmax": _array(norms / 20, "<f4"),
        "nan_count": _array(np.zeros(n_tensors), "<i8"),
        "inf_count": _array(np.zeros(n_tensors), "<i8"),
    }
    global_norm = float(np.sqrt(np.sum(norms.astype(np.float64) ** 2)))
    return dict(protocol.step_document(step, tensors=tensors, lr=[3e-4], global_grad_norm=global_norm, **common))


async def simulate(urls: list[str], ranks: int, seconds: float, n_tensors: int, sampled_every: int) -> dict:
    url = urls[0]  # registration and /metrics
    instance = uuid.uuid4().hex
    # A client per rank, as each rank of a job has its own transport: one pool queueing 512 ranks' requests
    # would cost the simulator more CPU than the collector (its pool is scanned for every request).
    async with AsyncExitStack() as clients:
        client = await clients.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
        own = [
            await clients.enter_async_context(
                httpx.AsyncClient(base_url=urls[rank % len(urls)], timeout=60, limits=httpx.Limits(max_connections=1))
            )
            for rank in range(ranks)
        ]
        for rank in range(ranks):
            document = protocol.run_document(
                RUN, rank=rank, world_size=ranks, format="bf16", tensors=_tensors(n_tensors), instance=instance
            )
            response = await client.post(protocol.RUNS_PATH, content=protocol.dumps(dict(document)), headers=JSON)
            response.raise_for_status()
        latencies: list[float] = []
        sizes: list[int] = []
        errors: Counter[str] = Counter()
        scrapes: list[float] = []
        start = time.monotonic()
        steps = int(seconds)

        async def sender(rank: int) -> None:
            """One rank's transport: its step s is due at start + s - 1 (ranks spread over the second); it sends
            what is due, at most BATCH_STEPS steps, at most once per BATCH_SECONDS, and waits for the answer."""
            rng = np.random.default_rng(rank)
            offset = rank / ranks
            produced = 0
            while produced < steps:
                now = time.monotonic() - start - offset
                due = min(steps, int(now) + 1) if now >= 0 else 0
                if due <= produced:
                    await asyncio.sleep(produced + 1 - now)
                    continue
                numbers = list(range(produced + 1, min(due, produced + BATCH_STEPS) + 1))
                documents = [
                    step_document(rank, n, n_tensors, (n - 1) % sampled_every == 0, rng)  # type: ignore[arg-type]
                    for n in numbers
                ]
                batch = protocol.batch_document(
                    RUN,
                    rank=rank,
                    instance=instance,
                    steps=documents,  # type: ignore[arg-type]
                    status="finished" if numbers[-1] == steps else "running",
                )
                began = time.perf_counter()
                try:
                    response = await own[rank].post(
                        f"{protocol.RUNS_PATH}/{RUN}/batches", content=protocol.dumps(dict(batch)), headers=JSON
                    )
                    response.raise_for_status()
                    latencies.append(time.perf_counter() - began)
                    sizes.append(len(numbers))
                    produced = numbers[-1]
                except httpx.HTTPStatusError as error:
                    errors[f"{error.response.status_code} {error.response.text[:60]}"] += 1
                except httpx.HTTPError as error:
                    errors[type(error).__name__] += 1
                await asyncio.sleep(max(0.0, BATCH_SECONDS - (time.perf_counter() - began)))

        async def scraper() -> None:
            while True:
                await asyncio.sleep(SCRAPE_EVERY_S)
                began = time.perf_counter()
                (await client.get("/metrics")).raise_for_status()
                scrapes.append(time.perf_counter() - began)

        async def progress() -> None:
            while True:
                await asyncio.sleep(10)
                recent = latencies[-2000:] or [0.0]
                print(
                    f"  t={time.monotonic() - start:5.0f}s: {sum(sizes)} steps in {len(sizes)} batches acknowledged, "
                    f"p50 {1e3 * np.median(recent):.0f} ms (last 2000), "
                    f"{np.mean(sizes[-2000:] or [0]):.1f} steps/batch",
                    flush=True,
                )

        scraping, reporting = asyncio.create_task(scraper()), asyncio.create_task(progress())
        await asyncio.gather(*(sender(rank) for rank in range(ranks)))
        reporting.cancel()
        scraping.cancel()
        final = []
        for _ in range(3):
            began = time.perf_counter()
            metrics = await client.get("/metrics")
            final.append(time.perf_counter() - began)
        return {
            "latencies": np.sort(np.asarray(latencies)),
            "steps_per_batch": float(np.mean(sizes)) if sizes else 0.0,
            "acknowledged_steps": sum(sizes),
            "errors": errors,
            "steps": steps,
            "scrapes": scrapes + final,
            "metrics_bytes": len(metrics.content),
            "metrics_series": sum(1 for line in metrics.text.splitlines() if line and not line.startswith("#")),
            "wall": time.monotonic() - start,
        }


def stored(database_url: str) -> dict[str, float]:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        run_id = connection.execute(sa.text("SELECT id FROM runs WHERE name = :n"), {"n": RUN}).scalar_one()

        def total(sql: str) -> float:
            return float(connection.execute(sa.text(sql), {"id": run_id}).scalar_one() or 0)

        out = {
            "step blocks": total(
                "SELECT sum(length(header) + length(arrays) + length(sampled)) FROM step_blocks WHERE run_id = :id"
            ),
            "rollups": total("SELECT sum(length(data)) FROM rollups WHERE run_id = :id"),
            "events": total("SELECT count(*) FROM events WHERE run_id = :id"),
            "inbox rows left": total("SELECT count(*) FROM rank_inbox WHERE run_id = :id"),
            "judged through": total("SELECT judged_through FROM rank_judge WHERE run_id = :id"),
            "table bytes": total(
                "SELECT sum(pg_total_relation_size(c)) FROM unnest(ARRAY['step_blocks','rollups','rank_state',"
                "'rank_inbox','rank_judge','events']::regclass[]) AS c"
            ),
        }
    engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--sampled-every", type=int, default=10)
    parser.add_argument(
        "--replicas", type=int, default=1, help="collector processes on the one database; rank r sends to r %% N"
    )
    parser.add_argument("--keep-log", type=int, default=0, help="print the last N characters of the collector's log")
    args = parser.parse_args()
    with ExitStack() as resources:
        workdir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="ranks-sim-")))
        server = resources.enter_context(postgres_server(durable=True))
        database_url = server.url
        db.upgrade(database_url)
        os.environ["NUMWATCH_METRICS_CACHE_SECONDS"] = "0"
        urls = [
            resources.enter_context(stack.running_collector(workdir / f"collector{i}", database_url))
            for i in range(args.replicas)
        ]
        print(f"collector log: {workdir / 'collector0' / 'collector.log'}", flush=True)
        print(
            f"{args.ranks} ranks x 1 step/s for {args.seconds:.0f} s, {args.tensors} tensors, PostgreSQL, "
            f"{args.replicas} collector process(es)",
            flush=True,
        )
        result = asyncio.run(simulate(urls, args.ranks, args.seconds, args.tensors, args.sampled_every))
        sizes = stored(database_url)
        if args.keep_log:
            print((workdir / "collector0" / "collector.log").read_text()[-args.keep_log :])
    latencies = 1e3 * result["latencies"]
    sent = result["steps"] * args.ranks
    print(
        f"\nsteps: {result['acknowledged_steps']} acknowledged of {sent} in {len(latencies)} batches "
        f"({result['steps_per_batch']:.1f} steps/batch), errors {dict(result['errors'])}"
    )
    print(
        f"ingest latency: p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, "
        f"max {latencies.max():.1f} ms; {len(latencies) / result['wall']:.0f} batches/s over {result['wall']:.0f} s"
    )
    steps = result["steps"]
    print(
        f"stored per step (all {args.ranks} ranks): step blocks {sizes['step blocks'] / steps:.0f} B, "
        f"rollups {sizes['rollups'] / steps:.0f} B; tables on disk {sizes['table bytes'] / steps:.0f} B/step"
    )
    print(
        f"cross-rank judging: through step {sizes['judged through']:.0f} of {steps}, "
        f"{sizes['inbox rows left']:.0f} rows queued, {sizes['events']:.0f} events"
    )
    scrapes = 1e3 * np.asarray(result["scrapes"])
    print(
        f"/metrics with {args.ranks} ranks: {result['metrics_series']} series, {result['metrics_bytes']} bytes; "
        f"scrape p50 {np.median(scrapes):.0f} ms, max {scrapes.max():.0f} ms ({len(scrapes)} scrapes)"
    )
    return 0 if not math.isnan(latencies.max()) else 1


if __name__ == "__main__":
    sys.exit(main())
