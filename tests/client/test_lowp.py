"""Low-precision readiness against a float64 reference written here from the scheme definitions,
element by element in Python floats: every representable value of each element format is
enumerated and a value rounds to the nearest, ties to the even code, so no torch cast is trusted.
Boundary cases: ties and their neighbours, subnormals, amax representable or not, all-zero
blocks, non-finite operands, blocks at row ends; and a planted outlier channel."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from numwatch.kernels import lowp

FLOAT32_MAX = 3.4028234663852886e38


def f32(value: float) -> float:
    """``value`` rounded to float32 (nearest even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0] if math.isfinite(value) and abs(value) < 3.5e38 else value


def below(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def above(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(np.inf)))


@dataclass(frozen=True)
class Minifloat:
    """A float format with ``exponent_bits``, ``mantissa_bits``, ``bias``, subnormals, and ``top_codes``
    of the all-ones exponent field that are finite (e4m3fn: 7, its 8th is NaN; e5m2: 0, Inf/NaN)."""

    exponent_bits: int
    mantissa_bits: int
    bias: int
    top_codes: int

    def code_value(self, code: int) -> float:
        """The magnitude of bit pattern ``code`` (sign aside), read as if every exponent field were finite."""
        steps = 1 << self.mantissa_bits
        field, mantissa = divmod(code, steps)
        if field == 0:
            return mantissa / steps * 2.0 ** (1 - self.bias)
        return (1 + mantissa / steps) * 2.0 ** (field - self.bias)

    def count(self) -> int:
        """How many non-negative finite values the format has (codes 0 .. count − 1)."""
        return ((1 << self.exponent_bits) - 1) * (1 << self.mantissa_bits) + self.top_codes

    def values(self) -> list[float]:
        """The non-negative finite values, ascending; index = bit pattern, so its parity is the code's."""
        return [self.code_value(code) for code in range(self.count())]

    def round(self, y: float) -> tuple[float, bool]:
        """(y rounded to nearest, ties to even code, saturating; whether it saturated: rounding with an
        unbounded exponent would go past the largest value, to the code after it or beyond)."""
        extended = self.values() + [self.code_value(self.count())]
        top = extended[-2]
        magnitude = abs(y)
        if magnitude >= extended[-1]:
            return math.copysign(top, y), True
        index = max(i for i, value in enumerate(extended) if value <= magnitude)
        lower, upper = extended[index], extended[index + 1]
        if magnitude - lower < upper - magnitude:
            chosen = index
        elif magnitude - lower > upper - magnitude:
            chosen = index + 1
        else:
            chosen = index if index % 2 == 0 else index + 1
        if chosen == len(extended) - 1:
            return math.copysign(top, y), True
        return math.copysign(extended[chosen], y), False


E4M3 = Minifloat(4, 3, 7, 7)
E5M2 = Minifloat(5, 2, 15, 0)
E2M1 = Minifloat(2, 1, 1, 2)
PER_TENSOR = {"e4m3": (E4M3, 448.0), "e5m2": (E5M2, 57344.0)}
SCHEMES_OF = {"e4m3": ("e4m3", "mxfp8", "mxfp8_up", "nvfp4"), "e5m2": ("e5m2", "mxfp8", "mxfp8_up", "nvfp4")}


def test_the_enumerated_formats_have_the_published_ranges() -> None:
    for fmt, largest, smallest, count in (
        (E4M3, 448.0, 2.0**-9, 127),
        (E5M2, 57344.0, 2.0**-16, 124),
        (E2M1, 6.0, 0.5, 8),
    ):
        values = fmt.values()
        assert (values[-1], values[1], len(values)) == (largest, smallest, count)
    assert E2M1.values() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


# --------------------------------------------------------------------------- reference schemes


@dataclass
class Element:
    q: float  # Q(x)
    flushed: bool
    saturated: bool


def ref_per_tensor(values: list[float], name: str, amax: float | None = None) -> list[Element]:
    fmt, largest = PER_TENSOR[name]
    amax = max((abs(v) for v in values), default=0.0) if amax is None else amax
    scale = min(f32(largest / amax), FLOAT32_MAX) if amax > 0 else 1.0
    out = []
    for x in values:
        q, saturated = fmt.round(f32(x * scale))
        out.append(Element(q / scale, x != 0 and q == 0, saturated))
    return out


def mx_exponent(amax: float, round_up: bool) -> int:
    if amax == 0:
        return -127
    floor_log2 = math.frexp(amax)[1] - 1
    e = floor_log2 - 8
    if round_up:
        e = floor_log2 - 9
        while amax > 448.0 * 2.0**e:
            e += 1
    return max(-127, min(127, e))


def ref_mx(block: list[float], round_up: bool) -> list[Element]:
    e = mx_exponent(max(abs(v) for v in block), round_up)
    out = []
    for x in block:
        q, saturated = E4M3.round(x / 2.0**e)
        out.append(Element(q * 2.0**e, x != 0 and q == 0, saturated))
    return out


def ref_nvfp4(block: list[float], amax: float) -> list[Element]:
    g = f32(amax / (448.0 * 6.0))
    b = f32(max(abs(v) for v in block) / 6.0)
    d, _ = E4M3.round(min(f32(b / g), 448.0) if g > 0 else 0.0)
    s = f32(g * d)
    out = []
    for x in block:
        if s == 0:
            out.append(Element(0.0, x != 0, False))
            continue
        q, saturated = E2M1.round(f32(x / s))
        out.append(Element(q * s, x != 0 and q == 0, saturated))
    return out


def ref_round_trip(matrix: np.ndarray, scheme: str, amax: float | None = None) -> list[list[Element]]:
    """Per row of the (rows, K) float32 matrix: each element's round trip; blocks end at the row's end
    (``amax``: the tensor's, when the rows are a sample of it)."""
    rows = [[float(v) for v in row] for row in matrix]
    if scheme in PER_TENSOR:
        flat = ref_per_tensor([v for row in rows for v in row], scheme, amax)
        width = matrix.shape[1]
        return [flat[i * width : (i + 1) * width] for i in range(len(rows))]
    amax = max((abs(v) for row in rows for v in row), default=0.0) if amax is None else amax
    block = 16 if scheme == "nvfp4" else 32
    out = []
    for row in rows:
        elements: list[Element] = []
        for start in range(0, len(row), block):
            part = row[start : start + block]
            elements += ref_nvfp4(part, amax) if scheme == "nvfp4" else ref_mx(part, scheme == "mxfp8_up")
        out.append(elements)
    return out


def ref_stats(tensor: torch.Tensor, per_tensor: str, rows: slice = slice(None)) -> list[float]:
    """The STAT_ROWS values of one operand: per scheme SQNR (dB), flushed share, saturated share; range.
    ``rows``: those of the operand's rows quantized (a sample), under the whole operand's amax."""
    whole = tensor.detach().float().reshape(-1, tensor.shape[-1] if tensor.dim() else 1).numpy()
    amax = float(np.abs(whole).max()) if whole.size else 0.0
    matrix = whole[rows]
    flat = [float(v) for v in matrix.reshape(-1)]
    if not all(math.isfinite(v) for v in flat):
        return [math.nan] * lowp.STAT_ROWS
    nonzero = [abs(v) for v in flat if v != 0]
    out = []
    for scheme in SCHEMES_OF[per_tensor]:
        elements = [e for row in ref_round_trip(matrix, scheme, amax) for e in row]
        signal = sum(x * x for x in flat)
        noise = sum((x - e.q) ** 2 for x, e in zip(flat, elements, strict=True))
        out.append(math.inf if noise == 0 else 10 * math.log10(signal / noise))
        out.append(sum(e.flushed for e in elements) / len(nonzero) if nonzero else 0.0)
        out.append(
            sum(e.saturated and x != 0 for x, e in zip(flat, elements, strict=True)) / len(nonzero) if nonzero else 0.0
        )
    out.append(math.log2(amax / min(nonzero)) if nonzero else 0.0)
    return out


def assert_stats_match(measured: torch.Tensor, expected: list[float]) -> None:
    """SQNR within 1e-4 dB (the kernel forms each error from the float32 scaled values), shares and range
    exactly up to float32 rounding."""
    values = measured.double().tolist()
    for row, (got, want) in enumerate(zip(values, expected, strict=True)):
        if math.isnan(want) or math.isinf(want):
            assert got == want or (math.isnan(got) and math.isnan(want)), (row, got, want)
        elif row % 3 == 0 and row < 12:
            # Beyond 100 dB the errors are as small as float32's rounding of the scaled values.
            assert got == pytest.approx(want, abs=1e-4 if want < 100 else 1.0), (row, got, want)
        else:
            assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (row, got, want)


# --------------------------------------------------------------------------- element formats


def _boundary_values(fmt: Minifloat) -> list[float]:
    """Every representable value, every midpoint between neighbours (a tie) and the float32 values
    just beside each, half the smallest subnormal, and values around and past the largest."""
    grid = fmt.values()
    points = list(grid)
    for low, high in zip(grid[:-1], grid[1:], strict=True):
        middle = (low + high) / 2
        points += [middle, below(middle), above(middle)]
    top = grid[-1]
    points += [top * 1.03, top * 1.0625, top * 1.1, top * 4, 1e30]
    points += [grid[1] / 2, below(grid[1] / 2), above(grid[1] / 2), grid[1] / 4]
    return sorted({f32(p) for p in points})


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1"])
def test_element_rounding_matches_the_reference_at_ties_and_beside_them(name: str) -> None:
    fmt = {"e4m3": E4M3, "e5m2": E5M2, "e2m1": E2M1}[name]
    points = _boundary_values(fmt)
    values = torch.tensor(points + [-p for p in points], dtype=torch.float32)
    if name == "e2m1":
        rounded = lowp.round_e2m1(values)
    else:
        rounded = lowp.round_fp8(values.clone(), lowp.PER_TENSOR[name])
    expected = [fmt.round(float(v))[0] for v in values]
    assert rounded.double().tolist() == expected
    element_format = lowp.E2M1 if name == "e2m1" else lowp.PER_TENSOR[name]
    saturated = (values.abs() > element_format.saturates_above).tolist()
    assert saturated == [fmt.round(float(v))[1] for v in values]


# --------------------------------------------------------------------------- round trips and statistics

SHAPES = [(8, 64), (5, 40), (3, 7, 96), (33,), (2, 16)]


def _sample(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Log-normal magnitudes over ~12 binades, signs random: subnormal codes and saturation both occur.
    magnitude = torch.exp2(torch.randn(shape, generator=generator) * 3)
    return magnitude * torch.sign(torch.randn(shape, generator=generator))


@pytest.mark.parametrize("scheme", ["e4m3", "e5m2", "mxfp8", "mxfp8_up", "nvfp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantized_values_match_the_reference(scheme: str, shape: tuple[int, ...]) -> None:
    x = _sample(shape, seed=len(shape) * 100 + shape[-1])
    matrix = x.reshape(-1, shape[-1]).numpy()
    expected = [e.q for row in ref_round_trip(matrix, scheme) for e in row]
    got = lowp.dequantize(x, scheme).reshape(-1).double().tolist()
    assert got == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.parametrize("per_tensor", ["e4m3", "e5m2"])
def test_batched_statistics_match_the_reference_per_operand(per_tensor: str) -> None:
    operands = [_sample(shape, seed=i) for i, shape in enumerate(SHAPES)]
    operands.append(torch.zeros(4, 32))  # all zero: exact, nothing to flush
    stats = lowp.readiness(lowp.operand_sums(operands, per_tensor))
    assert stats.shape == (lowp.STAT_ROWS, len(operands))
    for i, operand in enumerate(operands):
        assert_stats_match(stats[:, i], ref_stats(operand, per_tensor))


@pytest.mark.parametrize("per_tensor", ["e4m3", "e5m2"])
def test_a_row_budget_quantizes_evenly_spaced_rows_under_the_whole_operands_scales(per_tensor: str) -> None:
    # 300 rows with a budget of 64: every 5th row (60 rows); the largest element lies outside the
    # sample, so the per-tensor and NVFP4 scales and the amax must come from the whole operand.
    big = _sample((300, 96), seed=7)
    big[3, 40] = 4 * float(big.abs().max())
    small = _sample((50, 64), seed=8)  # within the budget: every row, exact
    padded = _sample((130, 40), seed=9)  # rows padded to whole blocks: every 3rd row
    stats = lowp.readiness(lowp.operand_sums([big, small, padded], per_tensor, max_rows=64))
    assert_stats_match(stats[:, 0], ref_stats(big, per_tensor, slice(None, None, 5)))
    assert_stats_match(stats[:, 1], ref_stats(small, per_tensor))
    assert_stats_match(stats[:, 2], ref_stats(padded, per_tensor, slice(None, None, 3)))
    exact = lowp.readiness(lowp.operand_sums([big], per_tensor))[:, 0]
    assert_stats_match(exact, ref_stats(big, per_tensor))
    big[7, 0] = math.nan  # outside the sample: the whole operand's amax still reports it
    assert torch.isnan(lowp.readiness(lowp.operand_sums([big, small], per_tensor, max_rows=64))[:, 0]).all()


def test_bf16_operands_are_measured_as_stored() -> None:
    x = _sample((16, 64), seed=3).bfloat16()
    stats = lowp.readiness(lowp.operand_sums([x, x.float()], "e4m3"))
    assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
    assert torch.equal(stats[:, 0], stats[:, 1])


def test_small_chunks_and_tensors_cut_across_chunks_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    operands = [_sample((40, 64), seed=1), _sample((3, 96), seed=2), _sample((9, 50), seed=4)]
    whole = lowp.readiness(lowp.operand_sums(operands, "e4m3"))
    monkeypatch.setattr(lowp, "CPU_CHUNK", 256)
    cut = lowp.readiness(lowp.operand_sums(operands, "e4m3"))
    torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------- boundary cases


def test_subnormal_codes_and_the_flush_threshold_under_a_unit_scale() -> None:
    """amax 448: the per-tensor scale is 1 and MX's exponent 0, so elements meet the e4m3 grid as they are."""
    tiny = 2.0**-9  # e4m3's smallest subnormal
    row = [448.0, tiny, tiny / 2, above(tiny / 2), 1.5 * tiny / 2, 2.5 * tiny, 3.5 * tiny] + [0.0] * 25
    x = torch.tensor([row])
    stats = lowp.readiness(lowp.operand_sums([x], "e4m3"))
    assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
    got = lowp.dequantize(x, "e4m3")[0, :7].tolist()
    assert got == [448.0, tiny, 0.0, tiny, tiny, 2 * tiny, 4 * tiny]
    assert stats[1, 0].item() == pytest.approx(1 / 7)  # tiny/2 is a tie and goes to 0: one of 7 non-zeros


def test_float32_subnormal_operands_flush_whole_and_clamp_the_scale() -> None:
    """amax the smallest float32 subnormal: 448 / amax overflows float32, the scale clamps to its largest."""
    smallest = float(np.float32(1.4e-45))
    x = torch.tensor([[smallest, -smallest] + [0.0] * 30])
    stats = lowp.readiness(lowp.operand_sums([x], "e4m3"))
    assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
    assert stats[1, 0].item() == 1.0  # per-tensor: everything flushed
    assert stats[4, 0].item() == 1.0  # MXFP8: the scale 2^-127 is too small as well
    assert stats[12, 0].item() == 0.0  # range: one binade


@pytest.mark.parametrize("amax", [448.0, 480.0, 449.0, 7.0, 1.0])
def test_amax_representable_or_not(amax: float) -> None:
    """448·2^j is e4m3's top: no saturation. 480 maps above 464 under the OCP rule and saturates;
    the round-up rule picks the next exponent and does not."""
    for shift in (0, 10, -20):
        row = [amax * 2.0**shift] + [v * 2.0**shift for v in (1.0, -3.0, 0.3, 100.0)] + [0.0] * 27
        x = torch.tensor([row])
        stats = lowp.readiness(lowp.operand_sums([x], "e4m3"))
        assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
        ocp_saturated, up_saturated = stats[5, 0].item(), stats[8, 0].item()
        assert ocp_saturated == pytest.approx(0.2 if amax == 480.0 else 0.0)
        assert up_saturated == 0.0
        assert stats[2, 0].item() == 0.0  # per-tensor scaling maps amax to 448 itself


def test_an_all_zero_block_among_others_and_an_all_zero_operand() -> None:
    x = torch.zeros(2, 64)
    x[0, 32:] = torch.linspace(-3, 5, 32)
    x[1, :32] = torch.linspace(0.001, 7, 32)
    stats = lowp.readiness(lowp.operand_sums([x, torch.zeros(3, 32)], "e4m3"))
    assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
    assert stats[:, 1].tolist() == [math.inf, 0.0, 0.0] * 4 + [0.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_operand_reports_nan_and_leaves_the_others_alone(bad: float) -> None:
    good = _sample((4, 64), seed=9)
    poisoned = _sample((4, 64), seed=10)
    poisoned[2, 5] = bad
    stats = lowp.readiness(lowp.operand_sums([good, poisoned, good], "e5m2"))
    assert torch.isnan(stats[:, 1]).all()
    assert_stats_match(stats[:, 0], ref_stats(good, "e5m2"))
    assert torch.equal(stats[:, 0], stats[:, 2])


@pytest.mark.parametrize(("scheme", "large"), [("mxfp8", 2.0**12), ("mxfp8_up", 2.0**12), ("nvfp4", 16.0)])
def test_blocks_end_at_the_row_end(scheme: str, large: float) -> None:
    """K = 40: a row's last block holds 8 elements. Row 0 ends with small values, row 1 is large: a block
    running on over the flattened tensor would flush row 0's tail with row 1's head."""
    x = torch.full((2, 40), 0.001)
    x[0, :32] = 1.0
    x[1, :] = large
    stats = lowp.readiness(lowp.operand_sums([x], "e4m3"))
    assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
    assert lowp.dequantize(x, scheme)[0, 32:].tolist() == pytest.approx([0.001] * 8, rel=0.07)
    straddling = lowp.dequantize(x.reshape(1, -1)[:, 32:64], scheme)  # row 0's tail in a block with row 1
    assert straddling[0, :8].tolist() == [0.0] * 8


def test_nvfp4_block_scales_that_round_to_zero_or_to_a_subnormal() -> None:
    """Blocks 2^-20 and 1.4·2^-17 of the tensor's amax: the first's e4m3 scale rounds to 0 (the block
    dequantizes to 0), the second's to a subnormal (2.45 → 2 times 2^-9), so coarse that its largest
    elements map to 7.35 and saturate."""
    x = torch.zeros(1, 48)
    x[0, :16] = 1000.0
    x[0, 16:32] = torch.linspace(0.1, 1, 16) * 1000.0 * 2.0**-20
    x[0, 32:] = torch.linspace(0.1, 1, 16) * 1000.0 * 2.0**-17 * 1.4
    stats = lowp.readiness(lowp.operand_sums([x], "e4m3"))
    assert_stats_match(stats[:, 0], ref_stats(x, "e4m3"))
    q = lowp.dequantize(x, "nvfp4")[0]
    assert q[16:32].tolist() == [0.0] * 16
    assert stats[11, 0].item() > 0  # nvfp4 saturated share


# --------------------------------------------------------------------------- the planted outlier channel


def outlier_activations(tokens: int = 64, channels: int = 128, channel: int = 5) -> torch.Tensor:
    """Unit-normal activations with one channel at ~1.9·2^20: 2^20 times the rest."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, channels, generator=generator)
    x[:, channel] = torch.where(torch.rand(tokens, generator=generator) < 0.5, -1.0, 1.0) * 1.9 * 2.0**20
    return x


def test_the_outlier_channel_model() -> None:
    """What each scheme does to a Linear input with one outlier channel, as the reference computes it:
    per-tensor e4m3 flushes every other channel; MXFP8 flushes only the channels sharing the outlier's
    block of 32 (the same threshold as per tensor there), and under the OCP rule the outlier itself
    saturates (1.9·2^20 / 2^12 = 486 > 464); the round-up scale never saturates."""
    x = outlier_activations()
    expected = ref_stats(x, "e4m3")
    stats = lowp.readiness(lowp.operand_sums([x], "e4m3"))[:, 0]
    assert_stats_match(stats, expected)
    table = {scheme: stats[3 * j : 3 * j + 3].tolist() for j, scheme in enumerate(SCHEMES_OF["e4m3"])}
    outlier_share = 1 / 128
    # Flushed: below 2^-10 of the scale, |x| < 4.4 here; a few unit-normal values are larger.
    assert table["e4m3"][1] == pytest.approx(1 - outlier_share, abs=1e-3)  # all but the outlier
    assert table["mxfp8"][1] == pytest.approx(31 / 128, abs=1e-3)  # only the outlier's block mates
    # OCP: every outlier saturates to 448·2^12, and so does the largest element of each other block
    # whose amax has a mantissa above 1.8125 (it maps above 464 as well).
    assert lowp.dequantize(x, "mxfp8")[:, 5].abs().eq(448.0 * 2**12).all()
    assert table["mxfp8"][2] > outlier_share
    assert table["mxfp8_up"][2] == 0.0  # round-up: never
    assert table["mxfp8_up"][1] == pytest.approx(31 / 128, abs=1e-3)
    assert table["mxfp8"][0] < table["mxfp8_up"][0]
    assert stats[12].item() > 20  # over 20 binades between the outlier and the smallest value


# --------------------------------------------------------------------------- an independent implementation


def test_mx_and_nvfp4_match_torchao_reference_casts() -> None:
    """torchao's MX (FLOOR: the OCP rule; RCEIL: round-up) and NVFP4 (two-level scales) casts, in eager
    mode on the CPU. Unit-normal data keeps clear of their documented differences: torchao clamps an MX
    scale to at least 2^-126 and an NVFP4 block scale to at least e4m3's smallest normal."""
    pytest.importorskip("torchao", reason="torchao (a test-only dependency) is not installed")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_mx
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(7)) * 3
    for scheme, mode in (("mxfp8", ScaleCalculationMode.FLOOR), ("mxfp8_up", ScaleCalculationMode.RCEIL)):
        scale, data = to_mx(x, torch.float8_e4m3fn, 32, mode)
        exponent = scale.view(torch.uint8).to(torch.int32) - 127
        theirs = (data.float().view(64, -1, 32) * torch.exp2(exponent.float()).unsqueeze(-1)).view(64, 256)
        assert torch.equal(lowp.dequantize(x, scheme), theirs), scheme
    per_tensor = per_tensor_amax_to_scale(x.abs().amax())
    block_scales, packed = nvfp4_quantize(x, 16, per_tensor)
    elements = f4_unpacked_to_f32(unpack_uint4(packed)).view(64, -1, 16)
    theirs = (elements * (per_tensor * block_scales.float()).unsqueeze(-1)).view(64, 256)
    torch.testing.assert_close(lowp.dequantize(x, "nvfp4"), theirs, rtol=1e-6, atol=0)
