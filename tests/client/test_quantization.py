"""Quantization SQNR against reference quantizers written here in float64 numpy, on weights
with planted outliers, exact grids (+inf) and shapes that leave partial groups and blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from numwatch.kernels import quantization
from numwatch.kernels.quantization import SCHEMES, nf4_codebook, quantization_sqnr

# Every statistic here holds on the CPU path and on the accelerator path (tests/client/conftest.py).
pytestmark = pytest.mark.usefixtures("device_path")

# The NF4 values as published with QLoRA (bitsandbytes' table).
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def ref_int8(w: np.ndarray) -> np.ndarray:
    rows = w.reshape(w.shape[0], -1)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        scale = np.max(np.abs(row)) / 127 or 1.0
        out[i] = np.clip(np.rint(row / scale), -127, 127) * scale
    return out.reshape(w.shape)


def ref_int4(w: np.ndarray) -> np.ndarray:
    rows = w.reshape(w.shape[0], -1)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        for start in range(0, row.size, 128):
            group = row[start : start + 128]
            scale = np.max(np.abs(group)) / 7 or 1.0
            out[i, start : start + 128] = np.clip(np.rint(group / scale), -8, 7) * scale
    return out.reshape(w.shape)


def ref_nf4(w: np.ndarray) -> np.ndarray:
    flat = w.reshape(-1)
    out = np.empty_like(flat)
    code = np.array(PUBLISHED_NF4)
    for start in range(0, flat.size, 64):
        block = flat[start : start + 64]
        absmax = np.max(np.abs(block)) or 1.0
        nearest = np.argmin(np.abs(block[:, None] / absmax - code[None, :]), axis=1)
        out[start : start + 64] = code[nearest] * absmax
    return out.reshape(w.shape)


def ref_e4m3(x: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3fn (3 mantissa bits, exponent bias 7, max 448, subnormal step 2^-9), half to even."""
    magnitude = np.abs(x)
    exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    step = 2.0 ** (np.maximum(exponent, -6) - 3)
    return np.sign(x) * np.minimum(np.rint(magnitude / step) * step, 448.0)


def ref_fp8(w: np.ndarray) -> np.ndarray:
    scale = np.max(np.abs(w)) / 448 or 1.0
    return ref_e4m3(w / scale) * scale


REFERENCES = {"int8": ref_int8, "int4": ref_int4, "nf4": ref_nf4, "fp8": ref_fp8}


def sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    noise = np.linalg.norm((w - q).ravel())
    return math.inf if noise == 0 else 20 * math.log10(np.linalg.norm(w.ravel()) / noise)


def planted(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Gaussian weights (float32-exact) with a few large outliers, as trained LLM layers grow."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    flat = w.reshape(-1)
    flat[rng.choice(flat.size, size=max(1, flat.size // 500), replace=False)] = 1.5
    flat[7] = -3.0
    return torch.from_numpy(w)


def test_nf4_codebook_built_from_normal_quantiles_is_the_published_one() -> None:
    assert nf4_codebook() == pytest.approx(PUBLISHED_NF4, abs=2e-7)
    assert len(set(nf4_codebook())) == 16 and 0.0 in nf4_codebook()


@pytest.mark.parametrize("shape", [(96, 300), (5, 3, 7), (64, 128)])
def test_every_scheme_matches_its_reference(shape: tuple[int, ...]) -> None:
    w = planted(shape)
    untouched = w.clone()
    got = quantization_sqnr([w])
    assert torch.equal(w, untouched)
    assert got.shape == (len(SCHEMES), 1) and got.dtype == torch.float32
    reference = w.double().numpy()
    for row, scheme in enumerate(SCHEMES):
        expected = sqnr_db(reference, REFERENCES[scheme](reference))
        assert got[row, 0].item() == pytest.approx(expected, abs=1e-3), scheme


def test_outliers_hurt_the_scaled_integer_schemes_not_fp8() -> None:
    w = planted((256, 512), seed=1)
    clean = torch.from_numpy(np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32) * 0.02)
    noisy, calm = quantization_sqnr([w, clean]).unbind(dim=1)
    for scheme in ("int8", "int4", "nf4"):
        index = SCHEMES.index(scheme)
        assert noisy[index] < calm[index], scheme  # an outlier stretches its row's, group's or block's scale
    # A float format keeps relative precision: the outliers are stored about as well as the rest.
    assert noisy[SCHEMES.index("fp8")] > 30
    # On Gaussian weights without outliers: int8 (≈ 40 dB) > fp8 (≈ 31 dB) > nf4 > int4 (≈ 20 dB).
    assert calm[0] > calm[3] > calm[2] > calm[1]


@pytest.mark.skipif(not hasattr(torch, "quantize_per_channel"), reason="this torch has no quantized tensors")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel")
def test_int8_per_channel_agrees_with_torch_quantize_per_channel() -> None:
    w = planted((48, 200), seed=2)
    scales = w.abs().amax(dim=1).double() / 127
    torch_q = torch.quantize_per_channel(w, scales, torch.zeros(48, dtype=torch.long), 0, torch.qint8).dequantize()
    expected = sqnr_db(w.double().numpy(), torch_q.double().numpy())
    assert quantization_sqnr([w])[0, 0].item() == pytest.approx(expected, abs=1e-3)


def test_exact_grids_give_infinity_and_small_tensors_nan() -> None:
    # Every row is integers times its scale with 127 present: int8 is exact; likewise int4
    # with values in multiples of 1/7 of each 128-group's abs-max, and all-zero weights.
    rng = np.random.default_rng(3)
    grid8 = torch.from_numpy(
        np.concatenate([rng.integers(-127, 128, (4, 63)), np.full((4, 1), 127)], axis=1).astype(np.float32) / 64
    )
    grid4 = torch.from_numpy(
        np.concatenate([rng.integers(-7, 8, (3, 127)), np.full((3, 1), 7)], axis=1).astype(np.float32) / 8
    )
    sqnr = quantization_sqnr([grid8, grid4, torch.zeros(8, 8), torch.ones(10), torch.zeros(0, 4)])
    assert sqnr[SCHEMES.index("int8"), 0].item() == math.inf
    assert sqnr[SCHEMES.index("int4"), 1].item() == math.inf
    assert torch.all(sqnr[:, 2] == math.inf)
    assert torch.isnan(sqnr[:, 3:]).all()


def test_chunking_does_not_change_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = [planted((40, 300), seed=4), planted((7, 5, 9), seed=5)]
    whole = quantization_sqnr(weights)
    monkeypatch.setattr(quantization, "CHUNK", 640)  # chunks of 2 rows / 10 NF4 blocks
    assert torch.allclose(quantization_sqnr(weights), whole, rtol=0, atol=1e-4)


def test_bf16_weights_are_measured_as_stored() -> None:
    w = planted((32, 256), seed=6).bfloat16()
    reference = w.double().numpy()
    got = quantization_sqnr([w])
    for row, scheme in enumerate(SCHEMES):
        assert got[row, 0].item() == pytest.approx(sqnr_db(reference, REFERENCES[scheme](reference)), abs=1e-3)


def test_nf4_search_picks_the_nearest_code_even_next_to_midpoints_and_cell_edges() -> None:
    """The table search against an exhaustive float64 nearest-value search (first, i.e.
    lower, code on a tie) on float32 values at, and one or two ulps beside, every midpoint
    between codes and every cell edge of the table, plus random values and ±1."""
    codes32 = torch.tensor(nf4_codebook(), dtype=torch.float32)
    mids = ((codes32[1:].double() + codes32[:-1].double()) / 2).float()
    edges = torch.arange(quantization.NF4_CELLS + 1, dtype=torch.float32) / (quantization.NF4_CELLS / 2) - 1
    near = torch.cat([mids, edges, codes32])
    probes = [near]
    for direction in (math.inf, -math.inf):
        one = torch.nextafter(near, torch.tensor(direction))
        probes += [one, torch.nextafter(one, torch.tensor(direction))]
    y = torch.cat([*probes, torch.rand(100_000, generator=torch.Generator().manual_seed(7)) * 2 - 1]).clamp(-1, 1)
    y = torch.cat([y, torch.zeros((-y.numel()) % 64)])
    blocks = y.reshape(-1, 64).clone()
    got = quantization._nf4_error(blocks.clone()).reshape(-1).double().numpy()
    code = codes32.double().numpy()
    y64 = y.double().numpy()
    nearest = code[np.argmin(np.abs(y64[:, None] - code[None, :]), axis=1)]
    np.testing.assert_array_equal(got, y64 - nearest)
    exact_ties = y64[np.isin(y64, ((codes32[1:].double() + codes32[:-1].double()) / 2).numpy())]
    assert exact_ties.size > 0  # some midpoints are float32 values: their ties are among the probes


def test_nonfinite_weights_give_nan_without_failing() -> None:
    w = planted((16, 256), seed=8)
    with_nan, with_inf = w.clone(), w.clone()
    with_nan[3, 5] = math.nan
    with_inf[0, 0] = math.inf
    sqnr = quantization_sqnr([with_nan, with_inf, w])
    assert torch.isnan(sqnr[:, :2]).all()
    assert torch.isfinite(sqnr[:, 2]).all()


def test_the_callers_cpu_thread_count_is_kept() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quantization_sqnr([planted((8, 128))])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
