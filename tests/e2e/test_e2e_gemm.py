"""End to end: numwatch.watch on the demo TinyGPT → a real collector → its API and /metrics.

The test sees every F.linear call itself (a TorchFunctionMode of its own, re-entered inside
nn.MultiheadAttention like the watcher's) and keeps each matmul's X, W and dY. Every operand of
every Linear the collector serves is the float64 reference of tests/client/test_lowp.py applied to
those tensors; the layer x step heatmap holds the same X values; /metrics exports the lowest SQNR
per operand and scheme; a threshold above the layers' e4m3 SQNR makes gemm_sqnr_low fire once.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, redispatch_function

import numwatch
from numwatch import protocol
from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches
from tests.client.test_lowp import ref_stats

RUN = "e2e-gemm"
STEPS = 4
EVERY = 2  # measured steps 1 and 3
THRESHOLD = 31.5  # e4m3 gives unit-normal-like operands 31.2 to 32 dB: some layers fall below


class LinearCalls(TorchFunctionMode):
    """Every F.linear call's X and W, and its dY once the backward has run."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, torch.Tensor]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            with self:
                return redispatch_function(func, types, args, kwargs)
        out = func(*args, **kwargs)
        if func is F.linear:
            call = {"x": args[0].detach().clone(), "w": args[1].detach().clone(), "id": args[1]}
            self.calls.append(call)
            out.register_hook(lambda gradient: call.__setitem__("dy", gradient.detach().clone()))
        return out


@pytest.mark.binaries
def test_every_operand_through_the_collector(collector: Any, tmp_path: Any) -> None:
    url = collector(None, NUMWATCH_DETECT_GEMM_SQNR_THRESHOLD=str(THRESHOLD), NUMWATCH_METRICS_CACHE_SECONDS="0")
    cfg = GPTConfig(vocab_size=128, context=16, d_model=32, n_heads=2, n_layers=2)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    names = {id(p): name for name, p in model.named_parameters()}
    batches = synthetic_batches(cfg, 2)
    seen: dict[int, list[dict[str, torch.Tensor]]] = {}
    with numwatch.watch(model, optimizer, run=RUN, url=url, histogram_every=EVERY, gemm_rows=0) as watcher:
        for step in range(1, STEPS + 1):
            x, y = next(batches)
            recorder = LinearCalls()
            with recorder:
                loss = lm_loss(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seen[step] = recorder.calls
        watcher.flush()
        assert watcher.monitoring_errors == 0

    with httpx.Client(base_url=url, timeout=30) as api:
        table = api.get(f"/api/v1/runs/{RUN}/gemm").json()
        assert table["step"] == 3 and table["threshold_db"] == THRESHOLD
        assert table["rows"] is None  # gemm_rows=0: every row, exact
        calls = {names[id(call["id"])]: call for call in seen[3]}
        assert sorted(layer["tensor"] for layer in table["layers"]) == sorted(calls)  # every Linear, tied head too
        for layer in table["layers"]:
            call = calls[layer["tensor"]]
            for operand, schemes in protocol.GEMM_OPERAND_SCHEMES.items():
                expected = ref_stats(call[operand], "e5m2" if operand == "dy" else "e4m3")
                served = layer["operands"][operand]
                got = [
                    protocol.decode_float(served["schemes"][scheme][field])
                    for scheme in schemes
                    for field in ("sqnr_db", "flushed", "saturated")
                ]
                got.append(protocol.decode_float(served["range_bits"]))
                for row, (a, b) in enumerate(zip(got, expected, strict=True)):
                    assert a == pytest.approx(b, rel=1e-5, abs=1e-4), (layer["tensor"], operand, row)
        worst = [protocol.decode_float(layer["worst"]["sqnr_db"]) for layer in table["layers"]]
        assert worst == sorted(worst)
        assert [layer["keep_bf16"] for layer in table["layers"]] == [value < THRESHOLD for value in worst]

        cells = api.get(f"/api/v1/runs/{RUN}/heatmap", params={"stat": "gemm_x_e4m3_sqnr"}).json()
        measured = [cell for cell in cells if not math.isnan(protocol.decode_float(cell["value"]))]
        assert sorted({cell["step"] for cell in measured}) == [1, 3]
        at_three = {cell["tensor"]: protocol.decode_float(cell["value"]) for cell in measured if cell["step"] == 3}
        assert at_three == {layer["tensor"]: pytest.approx(layer_x(layer)) for layer in table["layers"]}

        metrics = api.get("/metrics").text
        lowest_x = min(layer_x(layer) for layer in table["layers"])
        assert any(
            m.startswith('numwatch_gemm_sqnr_min_decibels{operand="x",rank="0",run="e2e-gemm",scheme="e4m3"}')
            and float(m.split()[-1]) == pytest.approx(lowest_x, rel=1e-6)
            for m in metrics.splitlines()
        )
        events = api.get(f"/api/v1/runs/{RUN}/events", params={"kind": "gemm_sqnr_low"}).json()
        assert events and events[0]["step"] == 1
        details = events[0]["details"]
        assert details["threshold"] == THRESHOLD and details["layer_count"] == len(details["layers"]) > 0
        assert all(protocol.decode_float(layer["sqnr_db"]) < THRESHOLD for layer in details["layers"])


def layer_x(layer: dict[str, Any]) -> float:
    return protocol.decode_float(layer["operands"]["x"]["schemes"]["e4m3"]["sqnr_db"])
