"""Adam health and quantization SQNR from a real training loop, through a real collector.

The loop: token embedding + MLP head, AdamW with warmup and cosine decay, two micro-batches
of gradient accumulation, ``clip_grad_norm_``. After ``optimizer.step()`` on the steps that
carry the statistics, the test computes its own float64 references from the optimizer's
state and the weights (independent formulas, see tests/test_quantization.py), and every
number the collector serves must equal them.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import numwatch
from numwatch import protocol
from tests.client.test_quantization import REFERENCES, sqnr_db

STEPS = 12
HISTOGRAM_EVERY, QUANT_EVERY = 5, 7  # Adam health at steps 1, 6, 11; quantization at 7 and close() (12)
ACCUMULATION = 2


def reference_adam(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[float, float]:
    state, group = optimizer.state[param], optimizer.param_groups[0]
    (beta1, beta2), eps, t = group["betas"], group["eps"], float(state["step"])
    m_hat = state["exp_avg"].double().numpy() / (1 - beta1**t)
    root = np.sqrt(state["exp_avg_sq"].double().numpy() / (1 - beta2**t))
    return float(np.sqrt(np.mean((m_hat / (root + eps)) ** 2))), float(np.mean(root < eps))


def reference_sqnr(weight: torch.Tensor) -> dict[str, float]:
    if weight.dim() < 2:
        return {scheme: math.nan for scheme in REFERENCES}
    w = weight.detach().double().numpy()
    return {scheme: sqnr_db(w, quantize(w)) for scheme, quantize in REFERENCES.items()}


def _decoded(value: float | str) -> float:
    return protocol.decode_float(value)


def train(url: str, run: str, forward_after: str | None) -> tuple[list[str], dict[int, dict], dict[int, dict]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 160), nn.GELU(), nn.Linear(160, 64))
    with torch.no_grad():
        model[3].weight[3, 17] = 8.0  # an outlier in the head
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / STEPS))
    )
    watcher = numwatch.watch(
        model, optimizer, run=run, url=url, histogram_every=HISTOGRAM_EVERY, quant_every=QUANT_EVERY
    )
    names = [name for name, _ in model.named_parameters()]
    adam: dict[int, dict] = {}
    quant: dict[int, dict] = {}
    generator = torch.Generator().manual_seed(1)
    for step in range(1, STEPS + 1):
        for _ in range(ACCUMULATION):
            tokens = torch.randint(0, 48, (16,), generator=generator)  # embedding rows 48..63 never get a gradient
            loss = nn.functional.cross_entropy(model(tokens), (tokens * 7 + 3) % 64) / ACCUMULATION
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step - 1) % HISTOGRAM_EVERY == 0:
            adam[step] = {name: reference_adam(optimizer, p) for name, p in model.named_parameters()}
        if step % QUANT_EVERY == 0:
            quant[step] = {name: reference_sqnr(p) for name, p in model.named_parameters()}
    if forward_after == "flush":
        watcher.flush()
    elif forward_after is not None:
        with torch.set_grad_enabled(forward_after == "with grad"):
            model(torch.arange(8))
    quant[STEPS] = {name: reference_sqnr(p) for name, p in model.named_parameters()}
    watcher.close()
    return names, adam, quant


@pytest.fixture
def api(collector):
    with httpx.Client(base_url=collector(), timeout=30) as client:
        yield client


def test_recorded_adam_health_and_sqnr_equal_the_references(api: httpx.Client) -> None:
    names, adam, quant = train(str(api.base_url), "health", forward_after=None)
    assert sorted(quant) == [7, STEPS] and sorted(adam) == [1, 6, 11]
    for step in range(1, STEPS + 1):
        tensors = api.get(f"/api/v1/runs/health/steps/{step}").json()["tensors"]
        has_adam = "adam_update_rms" in tensors[names[0]]
        assert has_adam == (step in adam), step
        assert ("quant_sqnr_int8" in tensors[names[0]]) == (step in quant), step
        for name in names:
            if step in adam:
                rms, dominated = adam[step][name]
                assert _decoded(tensors[name]["adam_update_rms"]) == pytest.approx(rms, rel=1e-5)
                assert _decoded(tensors[name]["adam_eps_dominated"]) == pytest.approx(dominated, rel=1e-5, abs=1e-7)
            if step in quant:
                for scheme, expected in quant[step][name].items():
                    got = _decoded(tensors[name][f"quant_sqnr_{scheme}"])
                    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-3), (
                        step,
                        name,
                        scheme,
                    )
    # The unused embedding rows have v = 0 < eps: a quarter of the embedding; the head is all normalised.
    assert adam[11]["0.weight"][1] == 0.25 and adam[11]["3.weight"][1] == 0

    table = api.get("/api/v1/runs/health/quantization", params={"sort": "int4"}).json()
    assert table["step"] == STEPS
    expected_order = sorted(
        (n for n in names if not math.isnan(quant[STEPS][n]["int4"])), key=lambda n: quant[STEPS][n]["int4"]
    )
    assert [row["tensor"] for row in table["tensors"]] == expected_order
    assert len(expected_order) == 3  # the two biases are not quantized

    families = text_string_to_metric_families(api.get("/metrics").text)
    minimum = {
        s.labels["scheme"]: s.value
        for f in families
        if f.name == "numwatch_quant_sqnr_min_decibels"
        for s in f.samples
        if s.labels["run"] == "health"
    }
    for scheme in REFERENCES:
        assert minimum[scheme] == pytest.approx(
            min(v[scheme] for v in quant[STEPS].values() if not math.isnan(v[scheme])), abs=1e-3
        )


@pytest.mark.parametrize("forward_after", ["no grad", "with grad", "flush"])
def test_close_measures_the_last_step_also_after_it_was_sent(api: httpx.Client, forward_after: str) -> None:
    """An evaluation under no_grad leaves the last step open for close(); after a forward with
    gradients or a flush() it was sent already, and close() sends a copy that adds the
    measurement, which the collector merges into the stored step (no conflict)."""
    names, _, quant = train(str(api.base_url), "evaluated", forward_after=forward_after)
    table = api.get("/api/v1/runs/evaluated/quantization").json()
    assert table["step"] == STEPS
    by_name = {row["tensor"]: row["sqnr_db"] for row in table["tensors"]}
    for name in ("0.weight", "1.weight", "3.weight"):
        assert _decoded(by_name[name]["nf4"]) == pytest.approx(quant[STEPS][name]["nf4"], abs=1e-3)
    summary = api.get("/api/v1/runs/evaluated").json()
    assert summary["last_step"] == STEPS and summary["steps_total"] == STEPS
    step = api.get(f"/api/v1/runs/evaluated/steps/{STEPS}").json()
    assert "grad_norm" in step["tensors"]["0.weight"] and "quant_sqnr_int8" in step["tensors"]["0.weight"]
