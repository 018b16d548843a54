"""`numwatch demo`: a watched fp16 training run that goes wrong on purpose, end to end.

It starts a collector on a temporary SQLite database (or uses ``--url``), trains a small
transformer on CPU under fp16 autocast with a GradScaler, and partway through provokes a
real instability: a runaway learning rate that explodes the gradients, loss-scale backoffs,
then NaN. At the end it prints what the collector detected and the URL of the run's page,
and keeps serving that page until Ctrl-C (``--exit`` stops right after the report).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from numwatch import protocol
from numwatch.monitor.ops.stack import running_collector, serve_until_interrupted


@dataclass(frozen=True)
class DemoPlan:
    steps: int = 240
    spike_at: int = 120  # the learning rate starts climbing here ...
    spike_lr: float = 50.0  # ... geometrically to this, which sends the weights (and fp16 activations) to Inf
    ramp_steps: int = 30  # ... over this many steps, so the gradients grow before anything is NaN
    base_lr: float = 3e-3
    batch_size: int = 8

    @classmethod
    def of_length(cls, steps: int) -> DemoPlan:
        """The same story in ``steps`` steps: healthy first half, then the runaway learning rate."""
        if steps < 60:
            raise ValueError(f"the demo needs at least 60 steps to tell its story, got {steps}")
        return cls(steps=steps, spike_at=steps // 2, ramp_steps=min(cls.ramp_steps, steps // 3))


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def train(url: str, run: str, plan: DemoPlan, out: TextIO) -> None:
    """The user's training loop: unchanged except for the one ``numwatch.watch`` line."""
    import torch

    import numwatch
    from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, context=32, d_model=128, n_heads=4, n_layers=2)
    model = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.base_lr)
    scaler = torch.amp.GradScaler("cpu", growth_interval=50)
    batches = synthetic_batches(cfg, plan.batch_size)

    watcher = numwatch.watch(
        model,
        optimizer,
        scaler=scaler,
        run=run,
        url=url,
        token=None,
        histogram_every=20,
        trace_activations=True,
        on_nonfinite="ignore",
        config={"model": "TinyGPT", "precision": "fp16-autocast", "demo": True},
    )
    with watcher:
        for step in range(1, plan.steps + 1):
            if plan.spike_at <= step <= plan.spike_at + plan.ramp_steps:
                progress = (step - plan.spike_at) / plan.ramp_steps
                for group in optimizer.param_groups:
                    group["lr"] = plan.base_lr * (plan.spike_lr / plan.base_lr) ** progress
                if step == plan.spike_at:
                    out.write(
                        f"  step {step}: learning rate starts climbing to {plan.spike_lr} over {plan.ramp_steps} "
                        "steps (the mistake)\n"
                    )
            inputs, targets = next(batches)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = lm_loss(model(inputs), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if step % 20 == 0 or step == plan.steps:
                _progress(out, step, plan.steps, loss.item(), scaler.get_scale())


def _progress(out: TextIO, step: int, total: int, loss: float, scale: float) -> None:
    width = 30
    done = width * step // total
    out.write(
        f"  [{'#' * done}{'.' * (width - done)}] step {step:>4}/{total}  loss {loss:>9.4g}  loss scale {scale:>8.4g}\n"
    )
    out.flush()


def report(url: str, run: str, out: TextIO, timeout: float = 30.0) -> list[dict]:
    """Wait until every step is stored, then print the detected events and where to look."""
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = _get_json(url + protocol.run_path(run))
        if info.get("status") in ("finished", "crashed"):
            break
        time.sleep(0.3)
    events = _get_json(url + protocol.run_path(run) + "/events")
    by_kind = Counter(e["kind"] for e in events)
    first: dict[str, dict[str, Any]] = {}
    for event in sorted(events, key=lambda e: e["step"]):
        first.setdefault(event["kind"], event)
    out.write(f"\nThe collector detected {len(events)} events in run {run!r}:\n")
    out.write(f"  {'kind':<22} {'count':>5}  {'first at step':>13}  details of the first\n")
    for kind, count in sorted(by_kind.items(), key=lambda kv: first[kv[0]]["step"]):
        details = json.dumps(first[kind]["details"])[:70]
        out.write(f"  {kind:<22} {count:>5}  {first[kind]['step']:>13}  {details}\n")
    out.write(
        "\nWhere to look:\n"
        f"  run page: {run_page_url(url, run)}   (diagnosis, charts, per-layer heatmap, histograms, events)\n"
        f"  all runs: {url}/\n"
        f"  JSON API: {url}{protocol.run_path(run)}/events   (and /docs)\n"
        f"  metrics:  {url}/metrics   (what Prometheus scrapes; alert rules in deploy/prometheus/)\n"
    )
    return events


def run_page_url(url: str, run: str) -> str:
    return f"{url}/runs/{quote(run, safe='')}"


def run_demo(
    url: str | None = None, plan: DemoPlan = DemoPlan(), keep_serving: bool = False, out: TextIO | None = None
) -> tuple[str, list[dict]]:
    """The whole demo; returns the run's name and the events the collector stored.

    With ``keep_serving``, a collector the demo started keeps serving (the run's page) until Ctrl-C.
    """
    out = out or sys.stdout
    run = f"demo-fp16-{time.strftime('%Y%m%d-%H%M%S')}"
    database: Path | None = None
    with contextlib.ExitStack() as resources:
        if url is None:
            workdir = resources.enter_context(tempfile.TemporaryDirectory(prefix="numwatch-demo-"))
            database = Path(workdir) / "numwatch.db"
            out.write("Starting a collector on a temporary SQLite database ...\n")
            url = resources.enter_context(running_collector(Path(workdir)))
        out.write(f"Collector at {url}. Training {run!r}: TinyGPT, fp16 autocast + GradScaler, CPU\n")
        started = time.monotonic()
        train(url, run, plan, out)
        out.write(f"Training finished in {time.monotonic() - started:.0f} s.\n")
        events = report(url, run, out)
        if keep_serving and database is not None:
            serve_until_interrupted(
                f"\nOpen {run_page_url(url, run)} in a browser. The collector serves it until Ctrl-C; its temporary\n"
                f"database goes then. To keep the page: numwatch export {run} --database-url sqlite:///{database} -o "
                f"{run}.html\n",
                out,
            )
        return run, events
