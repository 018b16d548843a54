"""numwatch.kernels.stats against independent float64 references on tensors built so the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from numwatch.formats import FormatSpec, format_spec
from numwatch.kernels import stats
from numwatch.protocol import (
    EXPONENT_BINADES,
    EXPONENT_BINS,
    EXPONENT_INF_BIN,
    EXPONENT_MIN,
    EXPONENT_NAN_BIN,
    EXPONENT_ZERO_BIN,
    FORMAT_COUNT_STATS,
    FORMATS,
    LINEAR_BINS,
)

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")

NAN = math.nan
INF = math.inf
SCALES = (1.0, 2.0**16, 2.0**-3)
GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _mixed_grads(seed: int = 0) -> list[torch.Tensor]:
    """fp32, fp16 and bf16 gradients of assorted shapes, interleaved."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(17, 9), (300,), (4, 5, 6), (1,), (64, 33), (2, 2)]
    return [(torch.randn(shape, generator=gen) * 3).to(GRAD_DTYPES[i % 3]) for i, shape in enumerate(shapes)]


def _f32(value: float) -> float:
    """``value`` rounded to float32."""
    return float(torch.tensor(value, dtype=torch.float32))


def _f32_next(value: float, toward: float) -> float:
    """The float32 neighbour of float32(value) in the direction of ``toward``."""
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)))


# --------------------------------------------------------------------------- grad_norms, weight_stats


def _reference_norms(tensors: list[torch.Tensor], multiplier: float = 1.0) -> np.ndarray:
    values = [t.double().numpy().ravel() * multiplier for t in tensors]
    return np.array([[np.sqrt(np.sum(v * v)) for v in values], [np.max(np.abs(v)) for v in values]])


@pytest.mark.parametrize("multiplier", [None, 2.0**-16, 0.1, torch.tensor(2.0**-16), torch.tensor(-3.0)])
def test_grad_norms_match_float64_reference(multiplier: float | torch.Tensor | None) -> None:
    grads = _mixed_grads()
    result = stats.grad_norms(grads, multiplier)
    assert result.dtype == torch.float32 and result.shape == (2, len(grads))
    factor = 1.0 if multiplier is None else abs(float(multiplier))
    np.testing.assert_allclose(result.double().numpy(), _reference_norms(grads, factor), rtol=2e-6)


def test_grad_norms_of_fp16_accumulate_beyond_fp16_range() -> None:
    # Each element fits in fp16, but the sum of squares (4096 * 60000**2) does not.
    grad = torch.full((4096,), 60000.0, dtype=torch.float16)
    norm, absmax = stats.grad_norms([grad])[:, 0].tolist()
    assert norm == pytest.approx(60000.0 * 64, rel=1e-5)  # float32 accumulation
    assert absmax == 60000.0


def test_grad_norms_propagate_nan_and_inf() -> None:
    clean = torch.ones(8)
    with_nan = torch.tensor([1.0, NAN, -2.0], dtype=torch.float16)
    with_inf = torch.tensor([1.0, -INF, 2.0], dtype=torch.bfloat16)
    with_both = torch.tensor([INF, NAN])
    result = stats.grad_norms([clean, with_nan, with_inf, with_both], 0.5)
    assert result[:, 0].tolist() == pytest.approx([math.sqrt(8) * 0.5, 0.5])
    assert torch.isnan(result[:, 1]).all()
    assert torch.isposinf(result[:, 2]).all()
    assert torch.isnan(result[:, 3]).all()


def test_grad_norms_of_empty_list_and_empty_tensor() -> None:
    assert stats.grad_norms([]).shape == (2, 0)
    assert stats.grad_norms([torch.zeros(0), torch.ones(4)]).tolist() == [[0.0, 2.0], [0.0, 1.0]]


def test_weight_stats_match_reference() -> None:
    weights = [torch.nn.Parameter(t.float()) for t in _mixed_grads(seed=1)]
    result = stats.weight_stats(weights)
    assert not result.requires_grad
    np.testing.assert_allclose(result.double().numpy(), _reference_norms([w.detach() for w in weights]), rtol=2e-6)


# --------------------------------------------------------------------------- nonfinite_counts


def test_nonfinite_counts_at_known_positions() -> None:
    a = torch.zeros(10)
    a[[1, 4, 7]] = NAN
    a[[2]] = INF
    a[[9]] = -INF
    b = torch.ones(5, 5, dtype=torch.float16)
    c = torch.full((6,), NAN, dtype=torch.bfloat16)
    c[0] = -INF
    result = stats.nonfinite_counts([a, b, c])
    assert result.dtype == torch.int64
    assert result.tolist() == [[3, 0, 5], [2, 0, 1]]


# --------------------------------------------------------------------------- format_counts


def reference_format_counts(grads: list[torch.Tensor], fmt: FormatSpec, scale: float) -> np.ndarray:
    """The definition itself: classify each x = grad * scale (float32) by the literal cast."""
    columns = []
    for grad in grads:
        x = grad.float() * scale
        finite = torch.isfinite(x)
        cast = x.to(fmt.dtype).double()
        zeros = x == 0
        underflow = finite & (x != 0) & (cast == 0)
        subnormal = finite & (cast != 0) & (cast.abs() < fmt.smallest_normal)
        if fmt.has_inf:
            overflow = finite & torch.isinf(cast)
        else:
            overflow = finite & (x.double().abs() > fmt.max)
        columns.append([int(mask.sum()) for mask in (zeros, underflow, subnormal, overflow)])
    return np.array(columns, dtype=np.int64).T.reshape(len(FORMAT_COUNT_STATS), len(grads))


def _boundary_values(fmt: FormatSpec) -> list[float]:
    """float32 values (the x the format sees) at, just above and just below every limit."""
    if fmt.has_inf:
        _, exponent = math.frexp(fmt.max)
        first_overflow = fmt.max + math.ldexp(torch.finfo(fmt.dtype).eps, exponent - 1) / 2
    else:
        first_overflow = fmt.max
    anchors = [
        fmt.smallest_subnormal / 2,
        fmt.smallest_subnormal,
        fmt.smallest_normal - fmt.smallest_subnormal / 2,
        fmt.smallest_normal,
        fmt.max,
        first_overflow,
    ]
    values = [0.0, -0.0, NAN, INF, -INF]
    for anchor in anchors:
        at = _f32(anchor)
        for value in (at, _f32_next(at, 0.0), _f32_next(at, INF)):
            if math.isfinite(value):
                values += [value, -value]
    return values


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", FORMATS)
def test_format_counts_equal_the_literal_cast_at_every_boundary(name: str, scale: float) -> None:
    fmt = format_spec(name)
    x = torch.tensor(_boundary_values(fmt), dtype=torch.float32)
    # grad = x / scale is exact (power-of-two scale) wherever float32 can hold it.
    grads = [x / scale, (x / scale).to(torch.float16), (x / scale).to(torch.bfloat16), torch.zeros(3)]
    result = stats.format_counts(grads, fmt, scale)
    assert result.dtype == torch.int64 and result.shape == (4, len(grads))
    np.testing.assert_array_equal(result.numpy(), reference_format_counts(grads, fmt, scale))


def test_format_counts_fp16_by_hand() -> None:
    fmt = format_spec("fp16")
    sub, normal = 2.0**-24, 2.0**-14
    x = [
        0.0,
        -0.0,  # zeros
        sub / 2,
        -_f32_next(sub / 2, 0.0),  # underflow: the tie and below round to 0
        _f32_next(sub / 2, 1.0),
        sub,
        -_f32_next(normal - sub / 2, 0.0),
        normal - sub,  # subnormal
        normal - sub / 2,
        _f32_next(normal, 0.0),
        65504.0,
        _f32_next(65520.0, 0.0),  # normal (the first two round up)
        65520.0,
        -1e6,  # overflow: the tie rounds to Inf
        NAN,
        INF,
        -INF,  # none
    ]
    result = stats.format_counts([torch.tensor(x)], fmt)
    assert dict(zip(FORMAT_COUNT_STATS, result[:, 0].tolist(), strict=True)) == {
        "zeros": 2,
        "underflow": 2,
        "subnormal": 4,
        "overflow": 2,
    }


def test_format_counts_fp8_e4m3_overflow_means_above_448() -> None:
    fmt = format_spec("fp8_e4m3")
    x = [448.0, _f32_next(448.0, INF), 460.0, 1000.0, -1e30, 2.0**-10, _f32_next(2.0**-10, 1.0), 2.0**-9, INF]
    result = stats.format_counts([torch.tensor(x)], fmt)
    assert result[:, 0].tolist() == [0, 1, 2, 4]


def test_format_counts_with_tensor_scale_and_mixed_dtypes() -> None:
    fmt = format_spec("fp16")
    grads = [g * 1e-11 for g in _mixed_grads(seed=3)]
    expected = reference_format_counts(grads, fmt, 2.0**12)
    np.testing.assert_array_equal(stats.format_counts(grads, fmt, torch.tensor(2.0**12)).numpy(), expected)
    assert expected[1].sum() > 0 and expected[2].sum() > 0  # the data do exercise the boundaries


def test_format_counts_do_not_modify_the_gradients() -> None:
    grad = torch.tensor([-1.0, -2.0, 3.0])
    stats.format_counts([grad], format_spec("fp16"))
    assert grad.tolist() == [-1.0, -2.0, 3.0]


_float32_values = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
# Magnitudes spread over the whole float32 range, so every format's limits are crossed.
_spread_values = st.builds(lambda m, e: math.ldexp(m, e), st.floats(-2.0, 2.0, width=32), st.integers(-150, 127)).map(
    _f32
)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.one_of(_float32_values, _spread_values), min_size=1, max_size=64),
    exponent=st.integers(-24, 24),
    name=st.sampled_from(FORMATS),
    dtype=st.sampled_from(GRAD_DTYPES),
)
def test_format_counts_property_equal_literal_cast(
    values: list[float], exponent: int, name: str, dtype: torch.dtype
) -> None:
    fmt = format_spec(name)
    scale = 2.0**exponent
    grads = [torch.tensor(values, dtype=torch.float32).to(dtype), torch.tensor(values[::-1], dtype=torch.float32)]
    np.testing.assert_array_equal(
        stats.format_counts(grads, fmt, scale).numpy(), reference_format_counts(grads, fmt, scale)
    )


# --------------------------------------------------------------------------- exponent_histogram


def reference_exponent_bins(tensor: torch.Tensor) -> np.ndarray:
    """Bin of each element from float64 floor(log2|x|) (exact here: no value is within
    float64 rounding of a power of two without being one)."""
    x = tensor.double().numpy().ravel()
    bins = np.empty(x.shape, dtype=np.int64)
    finite_nonzero = np.isfinite(x) & (x != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        binade = np.floor(np.log2(np.abs(x)))
    bins[finite_nonzero] = np.clip(binade[finite_nonzero] - EXPONENT_MIN, 0, EXPONENT_BINADES - 1)
    bins[x == 0] = EXPONENT_ZERO_BIN
    bins[np.isinf(x)] = EXPONENT_INF_BIN
    bins[np.isnan(x)] = EXPONENT_NAN_BIN
    return bins


def _hand_placed(dtype: torch.dtype) -> torch.Tensor:
    """Subnormals, normals, limits, zero, ±Inf and NaN of ``dtype``, with neighbours."""
    info = torch.finfo(dtype)
    smallest_subnormal = info.smallest_normal * info.eps
    values = [
        smallest_subnormal,
        3 * smallest_subnormal,
        info.smallest_normal - smallest_subnormal,
        info.smallest_normal,
        info.max,
        1.0,
        1.5,
        2.0 - info.eps,
        0.75,
        2.0**-3,
        0.0,
        -0.0,
        INF,
        -INF,
        NAN,
    ]
    values += [-v for v in values[:10]]
    return torch.tensor(values, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
)
def test_exponent_histogram_hand_placed_values(dtype: torch.dtype) -> None:
    tensor = _hand_placed(dtype)
    result = stats.exponent_histogram([tensor])
    assert result.dtype == torch.int64 and result.shape == (1, EXPONENT_BINS)
    expected = np.bincount(reference_exponent_bins(tensor), minlength=EXPONENT_BINS)
    np.testing.assert_array_equal(result[0].numpy(), expected)


def test_exponent_histogram_known_bins() -> None:
    fp16_subnormal = torch.tensor([2.0**-24, 2.0**-20 * 1.5], dtype=torch.float16)  # binades -24 and -20
    fp32 = torch.tensor([2.0**-149, 2.0**-130, 1.0, -3.0, 2.0**127, 0.0, INF, NAN])
    fp64 = torch.tensor([1e-300, 2.0**-150, 1e300, 2.0**127 * 1.9], dtype=torch.float64)  # clamped
    result = stats.exponent_histogram([fp16_subnormal, fp32, fp64])
    bin_of = lambda binade: binade - EXPONENT_MIN  # noqa: E731 - reads as the definition
    assert result[0].nonzero().flatten().tolist() == [bin_of(-24), bin_of(-20)]
    assert result[1].nonzero().flatten().tolist() == [
        bin_of(-149),
        bin_of(-130),
        bin_of(0),
        bin_of(1),
        bin_of(127),
        EXPONENT_ZERO_BIN,
        EXPONENT_INF_BIN,
        EXPONENT_NAN_BIN,
    ]
    assert result[2, 0] == 2 and result[2, EXPONENT_BINADES - 1] == 2


def test_exponent_histogram_random_mixed_tensors() -> None:
    gen = torch.Generator().manual_seed(5)
    # Log-uniform magnitudes over the float32 range (subnormals included), random signs.
    exponents = torch.randint(-150, 128, (4000,), generator=gen).double()
    values = torch.rand(4000, generator=gen, dtype=torch.float64).add(1).mul(torch.pow(2.0, exponents))
    values = values * torch.where(torch.rand(4000, generator=gen) < 0.5, -1.0, 1.0).double()
    values[::97] = 0.0
    values[::101] = NAN
    tensors = [values.float(), values[:1000].half(), values[1000:3000].bfloat16(), values[3000:]]
    result = stats.exponent_histogram(tensors)
    for row, tensor in zip(result, tensors, strict=True):
        np.testing.assert_array_equal(
            row.numpy(), np.bincount(reference_exponent_bins(tensor), minlength=EXPONENT_BINS)
        )
        assert int(row.sum()) == tensor.numel()


# --------------------------------------------------------------------------- finite_ranges, linear_histogram_counts


def linear_histogram(tensors, bins=LINEAR_BINS):
    """What the watcher records for unsharded tensors: each tensor's finite range, then counts over it."""
    lows, highs = stats.finite_ranges(tensors)
    return lows, highs, stats.linear_histogram_counts(tensors, lows, highs, bins)


def test_linear_histogram_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(5000, generator=gen)
    a[[3, 30, 300]] = torch.tensor([NAN, INF, -INF])
    b = (torch.randn(40, 30, generator=gen) * 1e-3).to(torch.bfloat16)
    c = torch.rand(777, generator=gen).half()
    lows, highs, counts = linear_histogram([a, b, c])
    assert counts.dtype == torch.int64 and counts.shape == (3, LINEAR_BINS)
    for i, tensor in enumerate([a, b, c]):
        x = tensor.double().numpy().ravel()
        x = x[np.isfinite(x)]
        expected, _ = np.histogram(x, bins=LINEAR_BINS, range=(x.min(), x.max()))
        np.testing.assert_array_equal(counts[i].numpy(), expected)
        assert (float(lows[i]), float(highs[i])) == (x.min(), x.max())


def test_linear_histogram_degenerate_tensors() -> None:
    constant = torch.full((9,), 2.5)
    constant[0] = NAN
    only_nonfinite = torch.tensor([NAN, INF])
    lows, highs, counts = linear_histogram([constant, only_nonfinite, torch.zeros(0)], bins=8)
    assert counts.tolist() == [[8, 0, 0, 0, 0, 0, 0, 0], [0] * 8, [0] * 8]
    assert (float(lows[0]), float(highs[0])) == (2.5, 2.5)
    assert torch.isnan(lows[1:]).all() and torch.isnan(highs[1:]).all()


# --------------------------------------------------------------------------- update_stats, snapshot


def test_snapshot_is_a_detached_copy() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    (copy,) = stats.snapshot([weight])
    with torch.no_grad():
        weight.add_(1.0)
    assert copy.tolist() == [1.0, 1.0, 1.0] and not copy.requires_grad


def test_update_stats_bf16_update_below_half_an_ulp() -> None:
    # bf16 has 8 significant bits: around 1.0 the ulp is 2**-7, half an ulp 2**-8.
    stuck = torch.nn.Parameter(torch.ones(6, dtype=torch.bfloat16))
    moving = torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.bfloat16))
    untouched = torch.nn.Parameter(torch.zeros(3))
    grads = [
        torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.bfloat16),
        torch.ones(4, dtype=torch.bfloat16),
        None,
    ]
    weights = [stuck, moving, untouched]
    before = stats.snapshot(weights)
    with torch.no_grad():
        stuck[:4].sub_(2.0**-10)  # below half an ulp: the stored value does not change
        stuck[4].sub_(0.5)  # moves, but its grad is 0: not counted either way
        moving.sub_(torch.tensor([0.5, 0.25, 2.0**-9, 0.0], dtype=torch.bfloat16))
    result = stats.update_stats(before, weights, grads)
    assert result.dtype == torch.float32 and result.shape == (2, 3)
    ratios = [
        np.linalg.norm(w.detach().double().numpy() - b.double().numpy()) / np.linalg.norm(b.double().numpy())
        for b, w in zip(before[:2], weights[:2], strict=True)
    ]
    np.testing.assert_allclose(result[0, :2].numpy(), ratios, rtol=1e-6)
    assert result[0, 2] == 0.0  # 0 / 0
    # stuck: 4 elements with grad != 0, all unchanged; moving: 2 of 4 unchanged (2**-9 and 0.0).
    assert result[1].tolist() == [1.0, 0.5, 0.0]


# --------------------------------------------------------------------------- exp_avg_sq_underflow


def test_exp_avg_sq_underflow_share() -> None:
    fmt = format_spec("fp16")
    state = torch.tensor([0.0, fmt.smallest_subnormal, _f32_next(fmt.smallest_normal, 0.0), fmt.smallest_normal, 1.0])
    result = stats.exp_avg_sq_underflow([state, None, torch.zeros(4)], fmt)
    assert result.dtype == torch.float32
    assert result[0] == pytest.approx(3 / 5)
    assert math.isnan(result[1]) and result[2] == 1.0
    # A state dtype (fp16) narrower than the format's range (bf16): its zeros still count.
    fp16_state = torch.tensor([0.0, 2.0**-24, 1.0, 0.0], dtype=torch.float16)
    assert stats.exp_avg_sq_underflow([fp16_state], format_spec("bf16")).tolist() == [0.5]


# --------------------------------------------------------------------------- no host-device sync


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_histc_count_used_off_the_cpu_equals_bincount(index_dtype: torch.dtype) -> None:
    codes = torch.randint(0, 40, (5000,), generator=torch.Generator().manual_seed(2)).to(index_dtype)
    codes[:7] = 44  # the last bin: histc's closed upper edge must not swallow or drop it
    np.testing.assert_array_equal(stats._histc_count(codes, 45).numpy(), np.bincount(codes.numpy(), minlength=45))


def _raise_sync(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("a statistic read a tensor value on the host (a device sync)")


def test_no_stat_function_reads_values_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    grads = _mixed_grads(seed=9)
    grads[0][0, 0] = NAN
    before = stats.snapshot(grads)
    after = [g * 0.5 for g in grads]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, _raise_sync)
    # The cached limit and bin tables are built inside the guard too.
    stats._format_limits.cache_clear()
    stats._exponent_bin_tables.cache_clear()
    results = [
        stats.grad_norms(grads, torch.tensor(0.5)),
        stats.nonfinite_counts(grads),
        *(stats.format_counts(grads, format_spec(name), 2.0**10) for name in FORMATS),
        stats.exponent_histogram(grads),
        *linear_histogram(grads),
        stats.weight_stats(grads),
        *stats.snapshot(grads),
        stats.update_stats(before, after, grads),
        stats.exp_avg_sq_underflow([g.float().abs() for g in grads] + [None], format_spec("bf16")),
    ]
    monkeypatch.undo()
    assert all(isinstance(result, torch.Tensor) for result in results)


def test_grad_norms_of_many_small_tensors_of_every_shape() -> None:
    # The CPU path gathers small tensors by trailing shape (one cat per shape, 0-d ones stacked):
    # interleaved shapes, then the same sizes in other shapes (the gathering is planned anew).
    gen = torch.Generator().manual_seed(3)
    shapes = [(), (4, 4), (4,), (1,), (2, 3, 4), (6,), (4, 4), (), (3, 8), (1, 1), (24,), (5, 4)] * 7
    grads = [torch.randn(shape, generator=gen) * 2.0 ** (i % 16 - 8) for i, shape in enumerate(shapes)]
    np.testing.assert_allclose(stats.grad_norms(grads).double().numpy(), _reference_norms(grads), rtol=2e-6)
    middle = [g.reshape(-1) if i == 4 else g for i, g in enumerate(grads)]  # first and last as planned
    np.testing.assert_allclose(stats.grad_norms(middle).double().numpy(), _reference_norms(grads), rtol=2e-6)
    reshaped = [g.reshape(-1) if g.dim() == 3 else g.reshape(g.shape[::-1]) for g in grads]
    np.testing.assert_allclose(stats.grad_norms(reshaped).double().numpy(), _reference_norms(grads), rtol=2e-6)
    strided = [g.t() if g.dim() == 2 else g for g in grads]  # not contiguous
    np.testing.assert_allclose(stats.grad_norms(strided).double().numpy(), _reference_norms(grads), rtol=2e-6)
    grads[30] = grads[30].clone().fill_(NAN)
    result = stats.grad_norms(grads)
    assert torch.isnan(result[:, 30]).all() and torch.isfinite(result[:, :30]).all()
