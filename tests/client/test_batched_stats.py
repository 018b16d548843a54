"""The batched statistics (flat chunks per (device, dtype) group) equal the same statistics
taken tensor by tensor, on the mixed-dtype tensors of one model, also when the chunks are
made tiny so that tensors are cut into pieces; format counts equal a literal cast at the
round-to-nearest-even boundaries inside one batched call; activation tracing names the
module where a NaN was born."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import numwatch
from numwatch.demo_model import GPTConfig, TinyGPT, lm_loss, synthetic_batches
from numwatch.formats import format_spec
from numwatch.kernels import chunks, stats
from numwatch.protocol import FORMATS
from tests.client.test_stats import SCALES, _boundary_values, reference_format_counts
from tests.support.watch_helpers import read_spool

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")

NAN, INF = math.nan, math.inf


class _MixedModel(nn.Module):
    """Layers in fp32, bf16 and fp16 (and a float64 scalar gain), interleaved in registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16).to(torch.bfloat16)
        self.c = nn.Linear(16, 12).to(torch.float16)
        self.d = nn.Linear(12, 4)
        self.gain = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h.bfloat16()).float())
        h = torch.tanh(self.c(h.half()).float())
        return self.d(h) * self.gain.float()


def _mixed_model_tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(grads, weights) of one backward of :class:`_MixedModel`, with NaN, ±Inf, zeros,
    subnormals and an empty tensor placed in some gradients."""
    torch.manual_seed(0)
    model = _MixedModel()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    weights = [p.detach() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    # Parameters in registration order: gain (a 0-d float64), then a, b, c, d (weight, bias).
    grads[1][0, :4] = torch.tensor([NAN, INF, -INF, 0.0])
    grads[3][1, :3] = torch.tensor([2.0**-130, -(2.0**-133), 0.0], dtype=torch.bfloat16)
    grads[5][0, :3] = torch.tensor([2.0**-24, NAN, 65504.0], dtype=torch.float16)
    return grads + [torch.zeros(0, dtype=torch.bfloat16)], weights + [torch.zeros(0, dtype=torch.bfloat16)]


NORMS = ("grad_norms", "weight")


def _all_statistics(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    before = stats.snapshot(weights)
    after = [w * 0.75 + 2.0**-12 for w in weights]
    lows, highs = stats.finite_ranges(grads)
    results = {
        "grad_norms": stats.grad_norms(grads, torch.tensor(0.5)),
        "nonfinite": stats.nonfinite_counts(grads),
        "exponent": stats.exponent_histogram(grads),
        "lows": lows,
        "highs": highs,
        "linear": stats.linear_histogram_counts(grads, lows, highs),
        "weight": stats.weight_stats(weights),
        "snapshot": torch.cat([b.reshape(-1).double() for b in before]),
        "update": stats.update_stats(before, after, grads),
        # The float64 gain has no state yet (None), the empty tensor an empty one.
        "exp_avg_sq": stats.exp_avg_sq_underflow(
            [None if g.dtype == torch.float64 else g.float().pow(2) for g in grads], format_spec("fp16")
        ),
    }
    for name in FORMATS:
        results[f"format {name}"] = stats.format_counts(grads, format_spec(name), torch.tensor(2.0**10))
        results[f"format {name} x0.3"] = stats.format_counts(grads, format_spec(name), 0.3)
    return results


def _one_by_one(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same statistics, each tensor on its own (no group, no concatenation)."""
    singles = [_all_statistics([g], [w]) for g, w in zip(grads, weights, strict=True)]
    joined = {}
    for name in singles[0]:
        parts = [single[name] for single in singles]
        rows_last = parts[0].dim() == 2 and name not in ("exponent", "linear")  # [rows, n] statistics
        joined[name] = torch.cat(parts, dim=1 if rows_last else 0)
    return joined


@pytest.mark.parametrize("chunk_elements", [chunks.FLAT_CHUNK_ELEMENTS, 7])
def test_each_statistic_of_a_mixed_dtype_model_equals_it_tensor_by_tensor(
    chunk_elements: int, monkeypatch: pytest.MonkeyPatch, device_path: str
) -> None:
    grads, weights = _mixed_model_tensors()
    assert {g.dtype for g in grads} == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    expected = _one_by_one(grads, weights)
    # Tiny chunks: tensors are cut into pieces and pieces of several tensors share a chunk.
    monkeypatch.setattr(chunks, "FLAT_CHUNK_ELEMENTS", chunk_elements)
    batched = _all_statistics(grads, weights)
    for name, result in batched.items():
        if name == "update" and chunk_elements == 7 or name in NORMS and device_path == "cpu":
            # Norms of cut tensors combine their pieces' norms, and on the CPU path small tensors'
            # squares are summed in float64 from their chunk: the rounding differs.
            np.testing.assert_allclose(result.numpy(), expected[name].numpy(), rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(result.numpy(), expected[name].numpy(), err_msg=name)


def test_the_statistics_see_the_values_placed_in_the_gradients() -> None:
    grads, _ = _mixed_model_tensors()
    result = _all_statistics(grads, [g.detach() for g in grads])
    assert result["nonfinite"][:, 1].tolist() == [1, 2] and result["nonfinite"][:, 5].tolist() == [1, 0]
    assert result["nonfinite"][:, -1].tolist() == [0, 0]  # the empty tensor
    assert math.isnan(result["lows"][-1]) and result["exponent"][-1].sum() == 0


@pytest.mark.parametrize("name", FORMATS)
def test_format_counts_at_the_rounding_boundaries_in_one_batched_call(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = format_spec(name)
    monkeypatch.setattr(chunks, "FLAT_CHUNK_ELEMENTS", 5)  # chunk edges fall inside the boundary lists
    values = torch.tensor(_boundary_values(fmt), dtype=torch.float32)
    for scale in SCALES:
        grads = [(values / scale).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float32)]
        result = stats.format_counts(grads, fmt, scale)
        np.testing.assert_array_equal(result.numpy(), reference_format_counts(grads, fmt, scale))
    # The ties themselves: half the smallest subnormal rounds to the even 0 (underflow); with
    # Inf, max + ulp(max)/2 rounds to the even Inf (overflow), the float32 just below it to max.
    half_subnormal = torch.tensor([fmt.smallest_subnormal / 2], dtype=torch.float32)
    assert half_subnormal.to(fmt.dtype).item() == 0.0 or name == "fp32"
    if fmt.has_inf and name != "fp32":
        _, exponent = math.frexp(fmt.max)
        tie = torch.tensor([fmt.max + math.ldexp(torch.finfo(fmt.dtype).eps, exponent - 1) / 2], dtype=torch.float32)
        below = torch.nextafter(tie, torch.tensor([0.0]))
        counts = stats.format_counts([tie, below, half_subnormal], fmt)
        assert counts[:, 0].tolist() == [0, 0, 0, 1] and counts[:, 1].tolist() == [0, 0, 0, 0]
        assert counts[:, 2].tolist() == [0, 1, 0, 0]


def test_ops_per_call_do_not_grow_with_the_number_of_tensors() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    def ops(n: int) -> int:
        tensors = [torch.randn(3, 5) for _ in range(n)] + [torch.randn(7).half() for _ in range(n)]
        with Count() as counter:
            stats.exponent_histogram(tensors)
            stats.linear_histogram_counts(tensors, *stats.finite_ranges(tensors))
            stats.format_counts(tensors, format_spec("fp16"), 2.0**8)
            stats.grad_norms(tensors)
        return counter.ops

    for _ in range(2):  # cached layouts, tables and scratch views built (a growing scratch buffer drops its views)
        ops(10), ops(40)
    assert ops(40) == ops(10)


def test_activation_tracing_names_the_module_where_the_nan_was_born_on_the_first_bad_step(tmp_path) -> None:
    cfg = GPTConfig(n_layers=3, d_model=64, vocab_size=128, context=16)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bad_step = 3
    state = {"step": 0}

    def poison(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        if state["step"] != bad_step:
            return output
        output = output.clone()
        output[0, 0, 0] = NAN
        return output

    model.blocks[1].mlp[0].register_forward_hook(poison)  # registered first: the tracer sees the NaN
    batches = synthetic_batches(cfg, 4, seed=2)
    with numwatch.watch(
        model, optimizer, run="nan-born", spool_dir=tmp_path, trace_activations=True, on_nonfinite="ignore"
    ) as watcher:
        for step in range(1, 5):
            state["step"] = step
            inputs, targets = next(batches)
            lm_loss(model(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    spooled = read_spool(watcher.spool_dir)
    (event,) = spooled.events
    assert event["step"] == bad_step and event["details"]["module"] == "blocks.1.mlp.0"


def test_activation_tracer_absmax_over_repeated_calls_and_outputs() -> None:
    from numwatch.capture.activations import ActivationTracer

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Identity()
            self.pair = _Pair()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.pair(self.inner(x))
            return self.inner(a) + b.float()

    model = Twice()
    tracer = ActivationTracer(model)
    model(torch.tensor([1.0, -3.0]))
    absmax, order = tracer.take_step(torch.device("cpu"))
    # inner ran twice: on [1, -3], then on 2*[1, -3] -> max |x| = 6; pair's second output is -Inf.
    assert [tracer.module_names[i] for i in order] == ["inner", "pair"]
    assert absmax.tolist() == [6.0, INF]
    model(torch.tensor([0.5, 0.25]))
    assert tracer.take_step(torch.device("cpu"))[0].tolist() == [1.0, INF]
    tracer.remove()


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 2 * x, torch.full_like(x, -INF).bfloat16()


@pytest.mark.parametrize("chunk_elements", [chunks.FLAT_CHUNK_ELEMENTS, 7])
@pytest.mark.parametrize(
    ("multiplier", "histogram_multiplier"), [(None, None), (torch.tensor(2.0**12), None), (None, torch.tensor(0.37))]
)
def test_the_shared_pass_equals_format_counts_and_exponent_histogram(
    chunk_elements, multiplier, histogram_multiplier, monkeypatch
) -> None:
    grads, _ = _mixed_model_tensors()
    monkeypatch.setattr(chunks, "FLAT_CHUNK_ELEMENTS", chunk_elements)
    unscaled = grads if histogram_multiplier is None else torch._foreach_mul(grads, histogram_multiplier)
    for name in ("fp16", "bf16", "fp8_e4m3"):
        fmt = format_spec(name)
        counts, histogram = stats.format_counts_and_exponent_histogram(grads, fmt, multiplier, histogram_multiplier)
        np.testing.assert_array_equal(counts.numpy(), stats.format_counts(grads, fmt, multiplier).numpy())
        np.testing.assert_array_equal(histogram.numpy(), stats.exponent_histogram(unscaled).numpy())


def test_reused_scratch_memory_leaves_no_trace_between_calls(device_path: str) -> None:
    """The CPU scratch buffers are reused uninitialised: what an earlier call (larger, other
    dtypes, NaN-filled) left in them must not reach a later call's statistics. (The
    accelerator path takes fresh memory instead, as uninitialised.)"""
    grads, weights = _mixed_model_tensors()
    chunks.release_scratch()
    first = _all_statistics(grads, weights)
    noise = [torch.full((4000,), NAN), torch.randn(3000, dtype=torch.float64) * 1e30, torch.full((999,), INF).half()]
    _all_statistics(noise, [n.clone() for n in noise])
    # The CPU path keeps a few slots, each grown to the largest chunk it served; the accelerator path none.
    assert 0 < len(chunks._scratch.buffers) <= 4 if device_path == "cpu" else not chunks._scratch.buffers
    again = _all_statistics(grads, weights)
    for name, result in first.items():
        np.testing.assert_array_equal(again[name].numpy(), result.numpy(), err_msg=name)
    chunks.release_scratch()
    assert not chunks._scratch.buffers


def test_threads_have_their_own_scratch_memory() -> None:
    """Two models trained in two threads take their statistics at the same time: each thread
    writes its temporaries into its own buffers."""
    import threading

    grads, weights = _mixed_model_tensors()
    other = [g * 3 - 1 for g in grads]
    expected = [_all_statistics(grads, weights), _all_statistics(other, weights)]
    results: list[list[dict[str, torch.Tensor]]] = [[], []]
    start = threading.Barrier(2)

    def run(index: int, tensors: list[torch.Tensor]) -> None:
        start.wait()
        for _ in range(20):
            results[index].append(_all_statistics(tensors, weights))

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate((grads, other))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(2):
        assert len(results[index]) == 20
        for result in results[index]:
            for name, value in expected[index].items():
                np.testing.assert_array_equal(result[name].numpy(), value.numpy(), err_msg=name)
