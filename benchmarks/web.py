"""Run-page load time of a long run in headless Chromium (100,000 steps x 300 tensors by default).

    python benchmarks/web.py [--steps 100000 --tensors 300 --loads 3 --workdir DIR]

Builds the run through the real HTTP API (batches of 500 steps, the hooks' default cadences:
format counts every 50 steps, grad and weight histograms every 100), starts a real collector
(``numwatch serve``) on SQLite, then loads ``/runs/RUN`` in headless Chromium ``--loads`` times
and prints the time to interactive (every chart, the heatmap and the histogram drawn, handlers
attached: the page's ``numwatch-ready`` performance mark, from navigation start) and each read
the page made as the browser timed it. Also times one live poll (``/tail`` after the last step).
Target: interactive within 2 s. With ``--workdir`` the database is kept there and reused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.parse
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.documents, tests.support.browser

from benchmarks.documents import batch_document, run_document  # noqa: E402
from numwatch import protocol  # noqa: E402
from numwatch.monitor import stack  # noqa: E402
from tests import browser  # noqa: E402

RUN = "long-run"
BATCH = 500


def build(url: str, args: argparse.Namespace) -> float:
    """Post the run; returns steps/s of ingest."""
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/api/v1/runs", json=run_document(RUN, args.tensors)).raise_for_status()
        for first in range(1, args.steps + 1, BATCH):
            count = min(BATCH, args.steps - first + 1)
            body = protocol.dumps(
                batch_document(RUN, first, count, args.tensors, rng, args.format_every, args.histogram_every)
            )
            client.post(
                f"/api/v1/runs/{RUN}/batches", content=body, headers={"Content-Type": "application/json"}
            ).raise_for_status()
            print(f"\r  ingested {first + count - 1}/{args.steps} steps", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return args.steps / (time.perf_counter() - started)


def load(driver, url: str) -> dict:
    browser.open_page(driver, f"{url}/runs/{RUN}", timeout=120)
    assert not driver.find_elements("id", "page-error"), driver.find_element("id", "page-error").text
    ready = driver.execute_script("return performance.getEntriesByName('numwatch-ready')[0].startTime")
    reads = driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/'))"
        ".map(e => [e.name, e.startTime, e.responseEnd, e.responseStart - e.requestStart])"
    )
    return {"ready_ms": ready, "reads": reads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--format-every", type=int, default=50)
    parser.add_argument("--histogram-every", type=int, default=100)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--workdir", help="keep the database here and reuse it when it already holds the run")
    args = parser.parse_args(argv)
    with ExitStack() as resources:
        workdir = (
            Path(args.workdir)
            if args.workdir
            else Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="numwatch-web-bench-")))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        fresh = not (workdir / "numwatch.db").exists()
        url = resources.enter_context(stack.running_collector(workdir))
        if fresh:
            print(f"building {args.steps} steps x {args.tensors} tensors through the HTTP API ...", file=sys.stderr)
            print(f"ingest: {build(url, args):.0f} steps/s")
        driver = resources.enter_context(browser.chromium())
        loads = [load(driver, url) for _ in range(args.loads)]
        print(
            f"\nrun page of {args.steps} steps x {args.tensors} tensors, {args.loads} loads in headless Chromium "
            "(1280x800):"
        )
        ready = [entry["ready_ms"] / 1e3 for entry in loads]
        print(
            f"  time to interactive: {', '.join(f'{r:.2f} s' for r in ready)} (median {statistics.median(ready):.2f} "
            "s; target 2 s)"
        )
        last_read = max(end for _, _, end, _ in loads[-1]["reads"])
        print(
            f"  of the last load: reads done at {last_read / 1e3:.2f} s, drawing after the last read "
            f"{(loads[-1]['ready_ms'] - last_read) / 1e3:.2f} s"
        )
        print("  reads of the last load, all in flight at once (server time = request sent to first byte):")
        for name, start, end, server in sorted(loads[-1]["reads"], key=lambda r: -r[3]):
            path = urllib.parse.unquote(name.split("://", 1)[1].split("/", 1)[1])
            print(f"    {server:8.0f} ms server  {end - start:8.0f} ms total  /{path}")
        polls = []
        with httpx.Client(base_url=url, timeout=60) as client:
            print("  the same reads one at a time:")
            for name, *_ in sorted(loads[-1]["reads"], key=lambda r: -r[3])[:8]:
                path = "/" + name.split("://", 1)[1].split("/", 1)[1]
                t0 = time.perf_counter()
                client.get(path).raise_for_status()
                print(f"    {1e3 * (time.perf_counter() - t0):8.0f} ms  {urllib.parse.unquote(path)}")
            last = client.get(f"/api/v1/runs/{RUN}").json()["last_step"]
            for _ in range(5):
                t0 = time.perf_counter()
                client.get(f"/api/v1/runs/{RUN}/tail", params={"after": last}).raise_for_status()
                polls.append(time.perf_counter() - t0)
        print(f"  live poll (/tail after the last step): median {1e3 * statistics.median(polls):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
