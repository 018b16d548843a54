"""End to end: loss and gradient-norm spikes from a real training loop → real collector →
real Prometheus running the deploy rules (one-second intervals).

The loop is the usual one: AdamW with warmup and cosine decay, two micro-batches of
gradient accumulation, ``clip_grad_norm_`` (measured before clipping via
``gradients_ready()``), the loss logged as a tensor. It is healthy for ``HEALTHY_STEPS``
steps (no spike alert may fire), then one batch of inputs and targets 30x larger makes
the loss and the gradient norm jump: both detectors fire at exactly that step and the
spike-rate alert fires for the run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import numwatch
from tests.support.promstack import collector_and_prometheus, get_json, instant_query, wait_for, wait_for_scraped_step

pytestmark = [pytest.mark.binaries, pytest.mark.slow]

RUN = "e2e-spike-run"
HEALTHY_STEPS = 200  # the detectors judge from step 129 (window 128)
SPIKE_STEP = HEALTHY_STEPS + 1
AFTER_STEPS = 5
ACCUMULATION = 2
TIMEOUT_S = 60.0


@dataclass
class Trained:
    collector: str
    prometheus: str
    alerts_before_spike: list[dict]
    losses: dict[int, float]
    norms: dict[int, float]


def _batch(
    generator: torch.Generator, true_weight: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.randn(16, 8, generator=generator)
    targets = inputs @ true_weight + 0.1 * torch.randn(16, 1, generator=generator)
    return scale * inputs, scale * targets


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    workdir = tmp_path_factory.mktemp("e2e-spikes")
    with ExitStack() as resources:
        collector, prometheus = collector_and_prometheus(resources, workdir)

        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(1)
        true_weight = torch.randn(8, 1, generator=generator)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        total = HEALTHY_STEPS + 1 + AFTER_STEPS
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / total))
        )
        watcher = numwatch.watch(model, optimizer, run=RUN, url=collector)
        resources.callback(watcher.close)
        losses: dict[int, float] = {}
        norms: dict[int, float] = {}
        alerts_before_spike: list[dict] = []
        for step in range(1, total + 1):
            scale = 30.0 if step == SPIKE_STEP else 1.0
            step_loss = torch.zeros(())
            for _ in range(ACCUMULATION):
                inputs, targets = _batch(generator, true_weight, scale)
                loss = nn.functional.mse_loss(model(inputs), targets) / ACCUMULATION
                loss.backward()
                step_loss += loss.detach()
            watcher.log(loss=step_loss)
            watcher.gradients_ready()
            norms[step] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step] = float(step_loss)
            if step == HEALTHY_STEPS:
                watcher.flush()
                seen = wait_for(
                    lambda: instant_query(prometheus, f'numwatch_steps_total{{run="{RUN}"}} >= {HEALTHY_STEPS}')[
                        "data"
                    ]["result"],
                    TIMEOUT_S,
                )
                assert seen, "Prometheus never scraped the healthy steps"
                wait_for(lambda: False, 2.5)  # two more rule evaluations
                alerts_before_spike = instant_query(prometheus, f'ALERTS{{run="{RUN}"}}')["data"]["result"]
        watcher.flush()
        wait_for_scraped_step(prometheus, RUN, total, TIMEOUT_S)
        yield Trained(collector, prometheus, alerts_before_spike, losses, norms)


def test_no_alert_on_the_healthy_steps(trained: Trained) -> None:
    assert trained.alerts_before_spike == []
    events = get_json(f"{trained.collector}/api/v1/runs/{RUN}/events")
    assert [e for e in events if e["step"] <= HEALTHY_STEPS] == []


def test_both_detectors_fire_at_the_spike_step_only(trained: Trained) -> None:
    events = get_json(f"{trained.collector}/api/v1/runs/{RUN}/events")
    assert sorted((e["step"], e["kind"]) for e in events if e["kind"].endswith("_spike")) == [
        (SPIKE_STEP, "grad_norm_spike"),
        (SPIKE_STEP, "loss_spike"),
    ]
    loss_event = next(e for e in events if e["kind"] == "loss_spike")
    assert loss_event["details"]["loss"] == pytest.approx(trained.losses[SPIKE_STEP], rel=1e-6)
    assert loss_event["details"]["note"] == "grad norm spiked at the same step"
    record = get_json(f"{trained.collector}/api/v1/runs/{RUN}/steps/{SPIKE_STEP}")
    # The recorded numbers are the loop's own: the logged loss and the norm clip_grad_norm_ returned.
    assert record["loss"] == pytest.approx(trained.losses[SPIKE_STEP], rel=1e-6)
    assert record["global_grad_norm"] == pytest.approx(trained.norms[SPIKE_STEP], rel=1e-5)


def test_spike_rate_alert_fires_for_the_run(trained: Trained) -> None:
    def firing() -> list[dict]:
        query = f'ALERTS{{alertname="NumwatchSpikeRateHigh", alertstate="firing", run="{RUN}"}}'
        return instant_query(trained.prometheus, query)["data"]["result"]

    alerts = wait_for(lambda: len(firing()) == 2 and firing(), TIMEOUT_S)
    assert alerts, f"no spike-rate alert for {RUN} within {TIMEOUT_S}s"
    assert sorted(alert["metric"]["signal"] for alert in alerts) == ["grad_norm", "loss"]
    judged = SPIKE_STEP + AFTER_STEPS - 128
    score = instant_query(
        trained.prometheus, f'max without(instance) (numwatch_spike_score{{run="{RUN}", signal="loss"}})'
    )
    assert float(score["data"]["result"][0]["value"][1]) == pytest.approx(1 / judged, rel=1e-9)
