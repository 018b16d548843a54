"""End to end: attention logits made to grow in a real training loop → real collector → real
Prometheus running the deploy rules (one-second intervals).

A nanoGPT-style model trains with AdamW, gradient accumulation and clip_grad_norm_; after each
optimizer step the query and key projections of one layer are scaled up by 1.3, so its logits
grow by 1.69x per step. The loop computes every step's logits itself (float64, from the
layer's own inputs): the attention_logit_growth event is at the first measured step whose
maximum exceeds 100 and names that layer only, no alert fires before it, and the
NumwatchAttentionLogitHigh alert fires after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import torch

import numwatch
from tests.client.test_attention import reference_max
from tests.e2e.test_e2e_alerting import FORWARD_PANELS, _panels
from tests.support.nanogpt import NanoGPT
from tests.support.promstack import (
    collector_and_prometheus,
    get_json,
    grafana_expr,
    instant_query,
    wait_for,
    wait_for_scraped_step,
)

pytestmark = [pytest.mark.binaries, pytest.mark.slow]

RUN = "e2e-attention-run"
GROWING = "transformer.h.1.attn"
LAYERS = [f"transformer.h.{i}.attn" for i in range(4)]
STEPS = 14
EVERY = 2  # measured steps 1, 3, 5, ...
ACCUMULATION = 2
TIMEOUT_S = 60.0


@dataclass
class Trained:
    collector: str
    prometheus: str
    crossing: int
    alerts_before: list[dict]
    maxima: dict[int, dict[str, float]]


def _scrape_and_evaluate(prometheus: str, step: int) -> None:
    wait_for_scraped_step(prometheus, RUN, step, TIMEOUT_S)
    wait_for(lambda: False, 2.5)  # two more rule evaluations


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    workdir = tmp_path_factory.mktemp("e2e-attention")
    with ExitStack() as resources:
        collector, prometheus = collector_and_prometheus(resources, workdir)

        torch.manual_seed(0)
        model = NanoGPT()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        watcher = numwatch.watch(model, optimizer, run=RUN, url=collector, attention_every=EVERY)
        resources.callback(watcher.close)
        inputs: dict[str, torch.Tensor] = {}
        for name in LAYERS:
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, n=name: inputs.__setitem__(n, a[0].detach())
            )
        data = torch.Generator().manual_seed(1)
        maxima: dict[int, dict[str, float]] = {}
        crossing, alerts_before = 0, []
        for step in range(1, STEPS + 1):
            for _ in range(ACCUMULATION):
                idx = torch.randint(0, 64, (4, 16), generator=data)
                _, loss = model(idx, idx.roll(-1, 1))
                current = maxima.setdefault(step, {})
                for name in LAYERS:
                    q, k, _ = model.get_submodule(name).qk(inputs[name])
                    current[name] = max(current.get(name, float("-inf")), reference_max(q, k, is_causal=True))
                (loss / ACCUMULATION).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.get_submodule(GROWING).c_attn.weight[: 2 * 32] *= 1.3  # the q and k rows
            if not crossing and (step - 1) % EVERY == 0 and max(maxima[step].values()) > 100:
                crossing = step
            if not crossing and step > 1 and (step - 1) % EVERY == 0:
                watcher.flush()
                _scrape_and_evaluate(prometheus, step)
                alerts_before += instant_query(prometheus, f'ALERTS{{run="{RUN}"}}')["data"]["result"]
        watcher.flush()
        wait_for_scraped_step(prometheus, RUN, STEPS, TIMEOUT_S)
        assert crossing and crossing < STEPS - EVERY, f"the logits did not cross 100 in time: {maxima}"
        yield Trained(collector, prometheus, crossing, alerts_before, maxima)


def test_no_alert_before_the_crossing(trained: Trained) -> None:
    assert trained.alerts_before == []
    assert max(trained.maxima[trained.crossing - EVERY].values()) <= 100


def test_the_event_is_at_the_crossing_step_and_names_the_layer(trained: Trained) -> None:
    events = get_json(f"{trained.collector}/api/v1/runs/{RUN}/events?kind=attention_logit_growth")
    assert [e["step"] for e in events] == [trained.crossing]  # once: the episode lasts to the end
    (layer,) = events[0]["details"]["layers"]
    assert layer["name"] == GROWING
    assert layer["value"] == pytest.approx(trained.maxima[trained.crossing][GROWING], rel=1e-5)
    series = get_json(f"{trained.collector}/api/v1/runs/{RUN}/forward")
    assert series["steps"] == list(range(1, STEPS + 1, EVERY))
    assert list(series["attention_logit_max"]) == LAYERS
    for name in LAYERS:  # every recorded number is the loop's own
        assert series["attention_logit_max"][name] == pytest.approx(
            [trained.maxima[s][name] for s in series["steps"]], rel=1e-5
        )
    assert series["run_max"]["call"] == GROWING and series["run_max"]["step"] == series["steps"][-1]


def test_the_alert_fires_for_the_run(trained: Trained) -> None:
    def firing() -> list[dict]:
        query = f'ALERTS{{alertname="NumwatchAttentionLogitHigh", alertstate="firing", run="{RUN}"}}'
        return instant_query(trained.prometheus, query)["data"]["result"]

    alerts = wait_for(firing, TIMEOUT_S)
    assert alerts, f"no attention-logit alert for {RUN} within {TIMEOUT_S}s"
    assert alerts[0]["metric"]["severity"] == "warning" and alerts[0]["metric"]["rank"] == "0"
    value = instant_query(trained.prometheus, f'max without(instance) (numwatch_attention_logit_max{{run="{RUN}"}})')
    last_measured = STEPS - (STEPS - 1) % EVERY
    assert float(value["data"]["result"][0]["value"][1]) == pytest.approx(
        max(trained.maxima[last_measured].values()), rel=1e-5
    )


def test_the_forward_pass_panels_find_the_run(trained: Trained) -> None:
    checked = 0
    for name, panel in _panels():
        if panel["title"] not in FORWARD_PANELS:
            continue
        for target in panel["targets"]:
            answer = instant_query(trained.prometheus, grafana_expr(target["expr"], RUN))
            assert answer["status"] == "success" and answer["data"]["result"], (
                f"{name}: {panel['title']}: {target['expr']}"
            )
            checked += 1
    assert checked == 5
