"""Low-precision readiness of matmul operands: what an fp8, MXFP8 or NVFP4 round trip does to a tensor.

Each scheme quantizes a tensor x and dequantizes it back, x -> Q(x); every element format
rounds to nearest, ties to even, with its subnormals, and saturates (clamps to ±its largest
finite value) instead of overflowing:

* ``e4m3`` / ``e5m2``: fp8 with one per-tensor scale, current scaling as Transformer Engine
  does it: s = fp32(M / amax), at most the largest float32 (1 when amax = 0), M = 448 for
  e4m3 (fn: no infinities) and 57344 for e5m2; q = fp8(x · s), Q(x) = q / s.
* ``mxfp8`` (OCP Microscaling Formats v1.0): e4m3 elements in blocks of 32 consecutive
  elements of a row (along the last dimension), one E8M0 scale 2^e per block with
  e = floor(log2(block amax)) − 8 (8 = e4m3's largest exponent), clamped to [−127, 127]:
  q = e4m3(x / 2^e), Q(x) = q · 2^e. A block amax in [448, 512)·2^(e) maps above 448, so
  the block's largest elements can saturate.
* ``mxfp8_up``: the same with the scale rounded up, e = the smallest integer with
  amax ≤ 448 · 2^e (torchao's RCEIL mode): x / 2^e never exceeds 448, nothing saturates.
* ``nvfp4``: e2m1 elements (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16 of a row, an e4m3
  scale per block and an fp32 per-tensor scale: G = fp32(amax / (448 · 6)),
  d = e4m3(min(fp32(fp32(block amax / 6) / G), 448)) (it may round to a subnormal or 0),
  S = fp32(G · d), q = e2m1(fp32(x / S)), Q(x) = q · S. A block whose d rounds to 0
  dequantizes to 0.

A row (the last dimension) whose length is not a multiple of the block ends in a shorter
block: its blocks never straddle two rows (the rows are zero-padded, and zeros change nothing).

Per tensor and scheme the readiness is the SQNR in dB, 10·log10(Σx² / Σ(x − Q(x))²), as
:func:`numwatch.kernels.quantization.sqnr_from_sums` defines it for the weights (+inf when
exact), the share of the non-zero elements that Q flushes to zero, and the share of the
non-zero elements that saturate: |x·s| rounds, with ties to even and an unbounded exponent,
above the format's largest value (e4m3: |x·s| > 464; e5m2: ≥ 61440; e2m1: ≥ 7). Per tensor
also its dynamic range, log2(amax / smallest non-zero |x|) (0 for an all-zero tensor).
A tensor holding NaN or ±Inf reports NaN for every number.

The errors are formed where they are exact or nearly so: on the scaled values, y − q (q is
within a factor 2 of y, or 0), summed per segment or block and multiplied by the decode scale
in float64. Follows the hot-path rules of :mod:`numwatch.kernels.stats`: no host sync; the
tensors of one (device, dtype) are concatenated into chunks (rows whose length is a multiple
of 32 need no padding, so their blocks are consecutive elements of the flat chunk), so the
ops per call grow with the chunks, not the number of tensors. A tensor whose rows need padding
is padded and measured in slices of at most a chunk, with ops of its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from numwatch.kernels.chunks import Chunk, layout_of, scratch
from numwatch.kernels.device import accelerator_path, to_device
from numwatch.kernels.quantization import _one_cpu_thread, sqnr_from_sums
from numwatch.kernels.stats import _absmax

MX_BLOCK = 32
NVFP4_BLOCK = 16
ALIGN = MX_BLOCK  # rows padded to a multiple of this hold whole blocks of both kinds
CPU_CHUNK = 1 << 18  # elements per chunk on the CPU: the temporaries stay near the core's caches
DEVICE_CHUNK = 1 << 24
FLOAT32_MAX = torch.finfo(torch.float32).max
E8M0_MIN, E8M0_MAX = -127, 127
E4M3_EMAX = 8  # 448 = 1.75 · 2^8
E2M1_MAX = 6.0
NVFP4_RANGE = 448.0 * E2M1_MAX  # what the per-tensor scale maps amax to


def _below(value: float) -> float:
    """The float32 just below ``value``: ``|y| > _below(v)`` is |y| ≥ v for float32 y."""
    return float(torch.nextafter(torch.tensor(value), torch.tensor(-math.inf)))


@dataclass(frozen=True)
class ElementFormat:
    """A float element format: its largest finite value, and the |y| above which rounding with an
    unbounded exponent exceeds it (the tie at the midpoint goes to the even neighbour)."""

    name: str
    max: float
    saturates_above: float
    dtype: torch.dtype | None  # torch's dtype, whose cast rounds to nearest even with subnormals


E4M3 = ElementFormat("e4m3", 448.0, 464.0, torch.float8_e4m3fn)  # 464: tie between 448 (even) and 480
E5M2 = ElementFormat("e5m2", 57344.0, _below(61440.0), torch.float8_e5m2)  # 61440: tie to 65536 (even)
E2M1 = ElementFormat("e2m1", E2M1_MAX, _below(7.0), None)  # 7: tie to 8 (even)
PER_TENSOR = {"e4m3": E4M3, "e5m2": E5M2}

# e2m1's spacing is 0.5 below 2, 1 in [2, 4), 2 in [4, 6]: |y| + C − C with C = 2^22 · 2·spacing
# rounds |y| to it (C's float32 spacing is the grid's), nearest even by float32's own rounding.
# C = 2^(22 + max(e, 0)), e = the exponent of |y| in [0, 2], from its bits.
_E2M1_BIASED_EXPONENTS = (127, 129)  # the exponent field of |y| in [1, 2) and [4, 6]

# The rows of operand_sums, summed over a tensor's pieces except amax (max) and min_nonzero (min).
SIGNAL, NONZERO, AMAX, MIN_NONZERO = range(4)
SCHEME_ROWS = 3  # per scheme: Σ(x − Q(x))², flushed count, saturated count
SUM_ROWS = 4 + 4 * SCHEME_ROWS
# The rows of readiness: per scheme SQNR, flushed share, saturated share; then the dynamic range.
STAT_ROWS = 4 * 3 + 1

# Scratch slots (numwatch.kernels.chunks.scratch) of this module's chunk-sized temporaries.
_X, _ABS, _Y, _Q, _TEMP, _MARKS, _FLAGS = range(10, 17)


def _chunk_elements(device: torch.device) -> int:
    return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK


@functools.cache
def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)


@functools.lru_cache(maxsize=64)
def _block_owner(lengths: tuple[int, ...], block: int, device: torch.device) -> Tensor:
    """int64 [blocks]: the segment of each ``block``-element block of a chunk with segments of ``lengths``."""
    counts = torch.tensor([length // block for length in lengths])
    return to_device(torch.repeat_interleave(torch.arange(len(lengths)), counts), device)


def _segment_sums(values: Tensor, lengths: list[int]) -> Tensor:
    """[segments]: the sum of the non-negative ``values`` (one per element or block) of each segment."""
    if len(lengths) == 1:
        return values.sum().reshape(1)
    return torch.stack(torch._foreach_norm(list(values.split(lengths)), 1))


def _pow2(exponent: Tensor) -> Tensor:
    """float32 2^n for integer n in [−126, 127], exact (built from its bits)."""
    return exponent.to(torch.int32).clamp(-126, 127).add_(127).bitwise_left_shift_(23).view(torch.float32)


def _pow2_double(exponent: Tensor) -> Tensor:
    """float64 2^n for integer n in [−1022, 1023], exact."""
    return exponent.to(torch.int64).add(1023).bitwise_left_shift_(52).view(torch.float64)


# --------------------------------------------------------------------------- element rounding


def round_fp8(y: Tensor, fmt: ElementFormat, out: Tensor | None = None, clamp: bool = True) -> Tensor:
    """float32 ``y`` rounded to ``fmt`` (fp8), saturating: torch's cast of the clamped value. ``clamp=False``
    where |y| is known not to exceed the format's largest value by more than float32 rounding (a cast
    rounds that back to it; torch before 2.12 gives NaN for values rounding past it)."""
    out = torch.empty_like(y) if out is None else out
    source = torch.clamp(y, -fmt.max, fmt.max, out=out) if clamp else y
    return out.copy_(source.to(fmt.dtype))


def round_e2m1(y: Tensor, out: Tensor | None = None) -> Tensor:
    """float32 ``y`` rounded to e2m1 (nearest, ties to even), saturating at ±6."""
    magnitude = torch.abs(y, out=out).clamp_(max=E2M1_MAX)
    low, high = _E2M1_BIASED_EXPONENTS
    field = magnitude.view(torch.int32).bitwise_right_shift(23).clamp_(low, high)
    offset = field.add_(22).bitwise_left_shift_(23).view(torch.float32)  # 2^(22 + max(e, 0)), e clamped
    return magnitude.add_(offset).sub_(offset).copysign_(y)


# --------------------------------------------------------------------------- the schemes on a chunk


@dataclass
class _Rounded:
    """A scheme's round trip of a chunk: ``y`` the scaled values, ``q`` them rounded (Q(x) = q · decode),
    ``decode`` float64 per segment (``block`` 0) or per block of ``block`` elements."""

    y: Tensor
    q: Tensor
    decode: Tensor
    block: int
    fmt: ElementFormat
    saturates: bool = True  # False: |y| never rounds past the format's largest value (saturated count 0)


def _per_tensor(chunk: Chunk, x: Tensor, amax: Tensor, fmt: ElementFormat) -> _Rounded:
    scale = torch.where(amax > 0, (fmt.max / amax).clamp_(max=FLOAT32_MAX), 1.0)
    y = chunk.per_segment_(scratch(chunk.numel, torch.float32, x.device, _Y).copy_(x), ("mul", scale))
    # |y| ≤ M up to float32 rounding: nothing saturates.
    q = round_fp8(y, fmt, out=scratch(chunk.numel, torch.float32, x.device, _Q), clamp=False)
    return _Rounded(y, q, scale.double().reciprocal(), 0, fmt, saturates=False)


def mx_exponents(block_amax: Tensor, round_up: bool) -> Tensor:
    """int32 [blocks]: the E8M0 exponent e of each block's scale 2^e (see the module docstring)."""
    mantissa, exponent = torch.frexp(block_amax)  # amax = m · 2^k, m in [0.5, 1): floor(log2 amax) = k − 1
    e = exponent - (E4M3_EMAX + 1)
    if round_up:  # amax ≤ 448 · 2^e  ⇔  m · 2^k ≤ 0.875 · 2^(9 + e)
        e = e + (mantissa > 448.0 / 512.0).to(torch.int32)
    return e.clamp_(E8M0_MIN, E8M0_MAX)


def _mx(x: Tensor, block_amax: Tensor, round_up: bool) -> _Rounded:
    e = mx_exponents(block_amax, round_up)
    y = scratch(x.numel(), torch.float32, x.device, _Y)
    torch.mul(x.view(-1, MX_BLOCK), _pow2(-e).unsqueeze(1), out=y.view(-1, MX_BLOCK))
    # Rounded up, amax / 2^e ≤ 448 exactly (and 2^e is exact): nothing saturates.
    q = round_fp8(y, E4M3, out=scratch(x.numel(), torch.float32, x.device, _Q), clamp=not round_up)
    return _Rounded(y, q, _pow2_double(e), MX_BLOCK, E4M3, saturates=not round_up)


def nvfp4_block_scales(block_amax: Tensor, tensor_amax: Tensor) -> Tensor:
    """float32 [blocks]: S = G · d of each 16-element block (0 where d rounds to 0), from its amax
    and its tensor's amax (one per block)."""
    g = tensor_amax / NVFP4_RANGE
    d = round_fp8(torch.where(g > 0, (block_amax / E2M1_MAX) / g, 0.0).clamp_(max=448.0), E4M3)
    return g * d


def _nvfp4(chunk: Chunk, x: Tensor, block_amax: Tensor, amax: Tensor) -> _Rounded:
    owner = _block_owner(tuple(chunk.lengths), NVFP4_BLOCK, x.device)
    scale = nvfp4_block_scales(block_amax, amax.index_select(0, owner))
    # A block whose scale rounded to 0 dequantizes to 0: dividing by 8·amax (1 for an all-zero
    # block) takes every |y| below 1/8, where e2m1 rounds to 0, and keeps y · scale = x.
    safe = torch.where(scale > 0, scale, torch.where(block_amax > 0, block_amax * 8.0, 1.0))
    y = scratch(x.numel(), torch.float32, x.device, _Y)
    torch.div(x.view(-1, NVFP4_BLOCK), safe.unsqueeze(1), out=y.view(-1, NVFP4_BLOCK))
    q = round_e2m1(y, out=scratch(x.numel(), torch.float32, x.device, _Q))
    return _Rounded(y, q, safe.double(), NVFP4_BLOCK, E2M1)


def _round_trip_sums(chunk: Chunk, rounded: _Rounded, nonzero: Tensor) -> list[Tensor]:
    """[segments] float64 each: Σ(x − Q(x))², flushed count, saturated count of the chunk's segments,
    given their counts of non-zero x (float64). Overwrites ``rounded.y`` with the error."""
    y, q = rounded.y, rounded.q
    device, numel = y.device, chunk.numel
    flags = scratch(numel, torch.bool, device, _FLAGS)
    marks = scratch(numel, torch.float32, device, _MARKS)
    if rounded.saturates:
        magnitude = torch.abs(y, out=scratch(numel, torch.float32, device, _TEMP))
        saturated = chunk.sums(marks.copy_(torch.gt(magnitude, rounded.fmt.saturates_above, out=flags))).double()
    else:
        saturated = torch.zeros(len(chunk.lengths), dtype=torch.float64, device=device)
    # Q(x) = 0 for x = 0: the flushed are the non-zero x less the non-zero q (an L1 norm of sign(q) counts those).
    flushed = nonzero - chunk.sums(torch.sign(q, out=marks)).double()
    error = y.sub_(q)  # exact: q is within a factor 2 of y, or 0
    if rounded.block == 0:
        norms = torch.stack(torch._foreach_norm(chunk.split(error), 2, dtype=torch.float64))
        noise = norms.mul_(rounded.decode).square_()
    else:
        norms = torch.linalg.vector_norm(error.view(-1, rounded.block), dim=1).double()
        noise = _segment_sums(norms.mul_(rounded.decode).square_(), [n // rounded.block for n in chunk.lengths])
    return [noise, flushed, saturated]


def _round_trips(
    chunk: Chunk, x: Tensor, absolute: Tensor, amax: Tensor, per_tensor: ElementFormat
) -> list[Callable[[], _Rounded]]:
    """The four schemes' round trips of a chunk, in row order, each made when it is iterated to
    (they share the chunk's scratch)."""
    blocks32 = absolute.view(-1, MX_BLOCK).amax(1)
    blocks16 = absolute.view(-1, NVFP4_BLOCK).amax(1)
    return [
        lambda: _per_tensor(chunk, x, amax, per_tensor),
        lambda: _mx(x, blocks32, round_up=False),
        lambda: _mx(x, blocks32, round_up=True),
        lambda: _nvfp4(chunk, x, blocks16, amax),
    ]


def _chunk_sums(chunk: Chunk, x: Tensor, amax: Tensor, per_tensor: ElementFormat) -> Tensor:
    """float64 [segments, SUM_ROWS] of a chunk (float32 ``x``, segment lengths multiples of ALIGN), given
    each segment's tensor amax (float32); the AMAX row is left 0 (the caller fills it)."""
    device, numel = x.device, chunk.numel
    absolute = torch.abs(x, out=scratch(numel, torch.float32, device, _ABS))
    nonzero = chunk.sums(torch.sign(x, out=scratch(numel, torch.float32, device, _TEMP))).double()
    # The smallest non-zero |x| as −max(−|x|) with zeros as −inf (NaN too: a NaN tensor reports NaN anyway).
    positive = torch.gt(absolute, 0, out=scratch(numel, torch.bool, device, _FLAGS))
    infinity = _constant((math.inf,), device)[0]
    negated = torch.where(positive, absolute, infinity, out=scratch(numel, torch.float32, device, _TEMP)).neg_()
    rows = [
        torch.stack(torch._foreach_norm(chunk.split(x), 2, dtype=torch.float64)).square_(),
        nonzero,
        torch.zeros(len(chunk.lengths), dtype=torch.float64, device=device),
        torch.stack(torch._foreach_max(chunk.split(negated))).double().neg_(),
    ]
    for make in _round_trips(chunk, x, absolute, amax, per_tensor):
        rows.extend(_round_trip_sums(chunk, make(), nonzero))
    return torch.stack(rows, 1)


# --------------------------------------------------------------------------- tensors


def _row_length(tensor: Tensor) -> int:
    return tensor.shape[-1] if tensor.dim() else 1


def _aligned_sums(members: list[Tensor], per_tensor: ElementFormat, amax: Tensor | None) -> Tensor:
    """float64 [SUM_ROWS, len(members)] of non-empty tensors whose rows hold whole blocks; ``amax``
    (float32 [members]) is the amax the per-tensor scales use, by default each member's own."""
    layout = layout_of(members, _chunk_elements(members[0].device))
    per_group = []
    for group in layout.groups:
        tensors = group.tensors(members)
        member_amax = torch.stack(list(_absmax(tensors))).float() if amax is None else group.select(amax)
        per_chunk = [
            _chunk_sums(chunk, chunk.into(tensors, _X, torch.float32), chunk_amax, per_tensor)
            for chunk, chunk_amax in zip(group.chunks, group.chunk_slices(group.per_segment(member_amax)), strict=True)
        ]
        sums = group.per_member(per_chunk, "sum")
        smallest = group.per_member([part[:, MIN_NONZERO].contiguous() for part in per_chunk], "amin")
        columns = [sums[:, :AMAX], member_amax.double().unsqueeze(1), smallest.unsqueeze(1), sums[:, MIN_NONZERO + 1 :]]
        per_group.append(torch.cat(columns, 1).t())
    return layout.columns(per_group, 0.0, torch.float64, SUM_ROWS)


def _padded_numel(tensor: Tensor) -> int:
    return tensor.numel() // _row_length(tensor) * (-(-_row_length(tensor) // ALIGN) * ALIGN)


def _padded(tensor: Tensor) -> Tensor:
    """float32 (rows, K'): the tensor's rows zero-padded to whole blocks (K' a multiple of ALIGN). The
    zeros change no sum, count, amax or block scale: a padded row measures as the row."""
    length = _row_length(tensor)
    return F.pad(tensor.reshape(-1, length).float(), (0, -(-length // ALIGN) * ALIGN - length))


def _padded_sums(tensor: Tensor, per_tensor: ElementFormat, amax: Tensor | None = None) -> Tensor:
    """float64 [SUM_ROWS]: :func:`_aligned_sums` of a tensor whose rows are zero-padded to whole blocks,
    a slice of rows at a time (``amax``: float32 [1], by default the tensor's)."""
    length = _row_length(tensor)
    rows = tensor.reshape(-1, length)
    padded_length = -(-length // ALIGN) * ALIGN
    amax = torch.stack(list(_absmax([tensor]))).float() if amax is None else amax
    per_slice = max(1, _chunk_elements(tensor.device) // padded_length)
    slices = [
        _aligned_sums([F.pad(rows[start : start + per_slice].float(), (0, padded_length - length))], per_tensor, amax)
        for start in range(0, rows.shape[0], per_slice)
    ]
    if len(slices) == 1:
        return slices[0][:, 0]
    stacked = torch.cat(slices, 1)
    total = stacked.sum(1)
    return torch.cat([total[:AMAX], amax.double(), stacked[MIN_NONZERO].amin().reshape(1), total[MIN_NONZERO + 1 :]])


def _amax_each(tensors: list[Tensor]) -> Tensor:
    """float32 [len(tensors)]: max |x| of each non-empty tensor (NaN propagates). On the CPU one
    ``aminmax`` read each (a multi-tensor abs would first write a copy of every tensor); elsewhere
    one multi-tensor kernel."""
    if accelerator_path(tensors[0].device):
        return torch.stack(list(_absmax(tensors))).float()
    return torch.stack([torch.maximum(high, low.neg()) for low, high in map(torch.aminmax, tensors)]).float()


def _sampled_rows(tensor: Tensor, max_rows: int) -> Tensor:
    """At most ``max_rows`` evenly spaced rows (along the last dimension) of ``tensor``, as a view."""
    rows = tensor.reshape(-1, _row_length(tensor))
    return rows if rows.shape[0] <= max_rows else rows[:: -(-rows.shape[0] // max_rows)]


@torch.no_grad()
def operand_sums(operands: Sequence[Tensor], per_tensor: str, max_rows: int = 0) -> Tensor:
    """float64 [SUM_ROWS, n] of each operand: Σx², non-zero count, amax, smallest non-zero |x|, then
    per scheme (``per_tensor``, "e4m3" or "e5m2", then "mxfp8", "mxfp8_up", "nvfp4"): Σ(x − Q(x))², flushed and
    saturated counts. Rows run along the last dimension. An empty operand has every sum 0.

    ``max_rows`` > 0: of an operand with more rows, only that many evenly spaced rows are quantized
    (whole rows hold whole blocks, so each sampled block is quantized as in the full tensor); the amax,
    and with it the per-tensor scales, is still the whole operand's. The sums are then the sample's:
    the SQNR and shares they give are estimates, the smallest non-zero |x| that of the sample."""
    fmt = PER_TENSOR[per_tensor]
    detached = [tensor.detach() for tensor in operands]
    device = detached[0].device if detached else torch.device("cpu")
    aligned = [i for i, t in enumerate(detached) if t.numel() and _row_length(t) % ALIGN == 0]
    padded = [i for i, t in enumerate(detached) if t.numel() and _row_length(t) % ALIGN]
    with _one_cpu_thread(device):
        amax: Tensor | None = None
        if max_rows > 0 and any(t.numel() > max_rows * _row_length(t) for t in detached):
            filled = aligned + padded
            amax = torch.zeros(len(detached), dtype=torch.float32, device=device)
            if filled:  # one read of the whole operands
                maxima = _amax_each([detached[i] for i in filled])
                amax = amax.index_copy_(0, to_device(torch.tensor(filled), device), maxima)
            detached = [_sampled_rows(t, max_rows) if t.numel() else t for t in detached]
        if aligned and len(aligned) == len(detached):
            return _aligned_sums(detached, fmt, amax)
        result = torch.zeros((SUM_ROWS, len(detached)), dtype=torch.float64, device=device)
        if aligned:
            subset = to_device(torch.tensor(aligned), device)
            columns = _aligned_sums(
                [detached[i] for i in aligned], fmt, amax.index_select(0, subset) if amax is not None else None
            )
            result.index_copy_(1, subset, columns)
        # Operands whose rows need padding: padded copies measured together when each fits a chunk
        # (the ops then do not grow with their number), else a slice of rows at a time.
        limit = _chunk_elements(device)
        whole = [i for i in padded if _padded_numel(detached[i]) <= limit]
        if whole:
            subset = to_device(torch.tensor(whole), device)
            copies = [_padded(detached[i]) for i in whole]
            columns = _aligned_sums(copies, fmt, amax.index_select(0, subset) if amax is not None else None)
            result.index_copy_(1, subset, columns)
        for i in padded:
            if i not in whole:
                result[:, i] = _padded_sums(detached[i], fmt, amax[i : i + 1] if amax is not None else None)
        return result


def readiness(sums: Tensor, owners: Sequence[int] | None = None, n: int | None = None) -> Tensor:
    """float32 [STAT_ROWS, n]: per scheme SQNR (dB), flushed share, saturated share, then the dynamic
    range (bits), from :func:`operand_sums` columns.

    With ``owners`` (the owner 0..n−1 of each column), the columns of one owner combine as the
    calls of one matmul over a step: the lowest SQNR and the largest range, the shares over all
    their elements. An owner without columns, and one with a non-finite column, report NaN."""
    device = sums.device
    schemes_noise = sums[4::SCHEME_ROWS]
    sqnr = sqnr_from_sums(torch.cat([sums[SIGNAL : SIGNAL + 1], schemes_noise]))
    counts = torch.cat([sums[5::SCHEME_ROWS], sums[6::SCHEME_ROWS], sums[NONZERO : NONZERO + 1]])
    nonzero_seen = sums[NONZERO] > 0
    bits = torch.where(nonzero_seen, torch.log2(sums[AMAX] / sums[MIN_NONZERO]), 0.0)
    nonfinite = (~torch.isfinite(sums[AMAX])).double()
    seen = torch.ones_like(nonfinite)
    if owners is not None:
        assert n is not None
        index = to_device(torch.tensor(list(owners), dtype=torch.int64), device)
        rows = sqnr.shape[0]
        sqnr = torch.full((rows, n), math.nan, device=device).scatter_reduce_(
            1, index.expand(rows, -1), sqnr, "amin", include_self=False
        )
        counts = counts.new_zeros((counts.shape[0], n)).index_add_(1, index, counts)
        bits = bits.new_full((n,), math.nan).scatter_reduce_(0, index, bits, "amax", include_self=False)
        nonfinite = nonfinite.new_zeros(n).index_add_(0, index, nonfinite)
        seen = seen.new_zeros(n).index_add_(0, index, seen)
    schemes_count = sqnr.shape[0]
    nonzero = counts[-1]
    shares = torch.where(nonzero > 0, counts[:-1] / nonzero.clamp(min=1), 0.0).float()
    per_scheme = [torch.stack([sqnr[j], shares[j], shares[schemes_count + j]]) for j in range(schemes_count)]
    stats = torch.cat([*per_scheme, bits.float().unsqueeze(0)])
    invalid = (nonfinite > 0) | (seen == 0)
    return stats.masked_fill(invalid, math.nan)


@torch.no_grad()
def dequantize(tensor: Tensor, scheme: str) -> Tensor:
    """float32 Q(x) of ``tensor`` (its shape) under ``scheme`` ("e4m3", "e5m2", "mxfp8", "mxfp8_up",
    "nvfp4"): the round trip the sums measure, element by element."""
    length = _row_length(tensor)
    padded_length = -(-length // ALIGN) * ALIGN
    rows = F.pad(tensor.detach().reshape(-1, length).float(), (0, padded_length - length))
    flat = rows.reshape(-1)
    if flat.numel() == 0:
        return tensor.detach().float().clone()
    chunk = layout_of([flat], flat.numel()).groups[0].chunks[0]
    absolute = flat.abs()
    amax = absolute.amax().reshape(1)
    per_tensor = PER_TENSOR.get(scheme, E4M3)
    order = (per_tensor.name, "mxfp8", "mxfp8_up", "nvfp4")
    rounded = _round_trips(chunk, flat, absolute, amax, per_tensor)[order.index(scheme)]()
    decode = rounded.decode if rounded.block == 0 else rounded.decode.repeat_interleave(rounded.block)
    values = (rounded.q.double() * decode).float()
    return values.view(-1, padded_length)[:, :length].reshape(tensor.shape)
