"""Per-tensor numeric statistics of gradients, weights and optimizer state.

Every function here runs on the training thread, once per step, so it must not stall
the device queue: it never synchronises with the device (no ``.item()``, no
Python branch on a tensor value, no data-dependent output sizes), and returns
device tensors with one entry (row or column) per input tensor, in input order.
Branches only look at shapes, dtypes and devices, which the host already knows.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from numwatch.formats import FormatSpec
from numwatch.kernels.chunks import FLAGS, INPUT, SECOND, WORK, Chunk, Layout, layout_of, scratch
from numwatch.kernels.device import accelerator_path, cuda_kernels, to_device
from numwatch.protocol import (
    EXPONENT_BINS,
    EXPONENT_INF_BIN,
    EXPONENT_MAX,
    EXPONENT_MIN,
    EXPONENT_NAN_BIN,
    EXPONENT_ZERO_BIN,
    LINEAR_BINS,
)

Multiplier = Tensor | float | None


# --------------------------------------------------------------------------- helpers


def _as_factor(multiplier: Tensor | float, device: torch.device) -> Tensor | float:
    """A multiplier as a float32 tensor on ``device`` (no sync: it stays a tensor) or a Python float."""
    if isinstance(multiplier, Tensor):
        return multiplier.detach().to(device=device, dtype=torch.float32, non_blocking=True)
    return float(multiplier)


@functools.cache
def _constant(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor (lookup table, bucket edges, column index) cached on ``device``."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def _count_values(codes: Tensor, bins: int) -> Tensor:
    """int64 [bins]: how often each integer 0..bins-1 occurs in ``codes`` (no other values occur).

    ``torch.bincount`` sizes its output from the data, a sync on accelerators. Off the CPU,
    ``torch.histc`` with a fixed range counts instead: no sync, and per-block privatised
    counters (an index_add_ of ones serialises on atomics when most values share a few
    bins: 250 ms per histogram step of a 100M-parameter model on an H100). Integer codes are
    exact in float64, and so are counts up to 2**53.
    """
    flat = codes.reshape(-1)
    if not accelerator_path(flat.device):
        return torch.bincount(flat, minlength=bins)
    return _histc_count(flat, bins)


def _histc_count(flat: Tensor, bins: int) -> Tensor:
    """int64 [bins]: counts of the integers 0..bins-1 in 1-D ``flat`` by histc over [0, bins) (no sync)."""
    return torch.histc(flat.to(torch.float64), bins=bins, min=0, max=bins).to(torch.int64)


def _segment_counts(chunk: Chunk, codes: Tensor, bins: int) -> Tensor:
    """int64 [segments, bins]: counts of the codes 0..bins-1 of a chunk's elements, per segment
    (one count; ``codes``, a fresh tensor, may be overwritten)."""
    segments = len(chunk.pieces)
    return _count_values(chunk.keys(codes, bins), segments * bins).view(segments, bins)


def _widened(flat: Tensor) -> Tensor:
    """fp8 widened to float16, exactly (float8_e4m3fn's NaN stays NaN; its subnormals become normal)."""
    if flat.dtype in _IEEE_LAYOUTS:
        return flat
    return flat.half() if flat.element_size() == 1 else flat.float()


@dataclass(frozen=True)
class _Cuts:
    """Buckets of the magnitudes of an IEEE dtype: the bucket of |x| is the number of cuts
    below its bit pattern (cuts ascending), as ``torch.bucketize(bits, cuts)`` counts them."""

    dtype: torch.dtype
    cuts: tuple[int, ...]


def _trailing_zeros(value: int, width: int) -> int:
    return width if value == 0 else (value & -value).bit_length() - 1


@functools.cache
def _bucket_table(cuts: _Cuts, device: torch.device) -> tuple[int, Tensor]:
    """(shift, table): the bucket of each key of :func:`_bucket_keys`.

    Every cut c splits "bits <= c" from "bits > c", so it lies on a multiple of 2**shift
    (c or c + 1 is one) for the largest such shift; between two consecutive multiples no
    cut falls, and each multiple and each open interval between two has one bucket. Key
    2k is the multiple k * 2**shift, key 2k + 1 the interval above it: the table is their
    buckets, computed once by ``torch.bucketize`` of one magnitude of each."""
    layout = _IEEE_LAYOUTS[cuts.dtype]
    width = layout.exponent_bits + layout.mantissa_bits
    shift = min([width - 1] + [max(_trailing_zeros(cut, width), _trailing_zeros(cut + 1, width)) for cut in cuts.cuts])
    keys = torch.arange(1 << (width + 1 - shift), dtype=torch.int64)
    representatives = (keys >> 1 << shift) + (keys & 1)
    table = torch.bucketize(representatives, torch.tensor(cuts.cuts, dtype=torch.int64)).to(layout.int_dtype)
    return shift, to_device(table, device)


def _bucket_keys(x: Tensor, shift: int, slot: int) -> Tensor:
    """key = floor(m / 2**shift) + ceil(m / 2**shift) of the magnitude bits m of each x (a
    writable temporary, where the keys are left; scratch ``slot`` holds a second one): 2k for
    m = k * 2**shift and 2k + 1 strictly between k and k + 1 times it. A few in-place integer
    passes, where a binary search per element among the cuts costs several times more."""
    layout = _IEEE_LAYOUTS[x.dtype]
    magnitude = x.view(layout.int_dtype).bitwise_and_(layout.magnitude_mask)
    negated_ceiling = torch.neg(magnitude, out=scratch(x.numel(), layout.int_dtype, x.device, slot))
    negated_ceiling.bitwise_right_shift_(shift)  # floor(-m / 2**shift) = -ceil(m / 2**shift)
    return magnitude.bitwise_right_shift_(shift).sub_(negated_ceiling)


def _bucket_codes(x: Tensor, cuts: _Cuts, slot: int) -> Tensor:
    """The bucket of each |x| between ``cuts`` (x of ``cuts.dtype``, a writable temporary
    the passes overwrite), as x's integer type in scratch ``slot`` (a writable temporary):
    the keys of :func:`_bucket_keys` through the table. So the exponent field decides, and
    the mantissa only where a cut lies within a binade, down to the exact bit pattern of each tie."""
    shift, table = _bucket_table(cuts, x.device)
    keys = _bucket_keys(x, shift, slot)
    return torch.index_select(table, 0, keys, out=scratch(x.numel(), table.dtype, x.device, slot))


# Keys counted directly, without the gather to buckets, while the counters stay cache-sized.
_DIRECT_COUNTERS = 1 << 18


def _bucket_counts(chunk: Chunk, x: Tensor, cuts: _Cuts, slot: int) -> Tensor:
    """int64 [segments, buckets]: per segment of a chunk, how many of its x (as in
    :func:`_bucket_codes`) fall in each bucket. With a small table (cuts on binade edges:
    the fp32 target, NaN/Inf) the keys themselves are counted and the counts folded."""
    shift, table = _bucket_table(cuts, x.device)
    buckets = len(cuts.cuts) + 1
    if len(chunk.pieces) * table.numel() > _DIRECT_COUNTERS:
        return _segment_counts(chunk, _bucket_codes(x, cuts, slot), buckets)
    by_key = _segment_counts(chunk, _bucket_keys(x, shift, slot), table.numel())
    return by_key.new_zeros((by_key.shape[0], buckets)).index_add_(1, table, by_key)


# --------------------------------------------------------------------------- gradients


def _absmax(members: list[Tensor]) -> Sequence[Tensor]:
    """max |x| of each (non-empty) tensor, as 0-d tensors of its dtype; NaN propagates.

    One multi-tensor kernel either way: ``_foreach_norm(ord=inf)`` on CUDA reads each
    tensor once; on the CPU it is ~100x slower than ``_foreach_max`` of ``_foreach_abs``
    (see benchmarks/stats_pass.py)."""
    if cuda_kernels(members[0].device):
        return torch._foreach_norm(members, math.inf)
    return torch._foreach_max(torch._foreach_abs(members))


def _l2_norm_and_absmax(tensors: Sequence[Tensor], layout: Layout | None = None) -> Tensor:
    """float32 [2, n]: L2 norm (accumulated in float32, float64 for small tensors on the CPU
    path) and abs-max of each tensor (``layout``: theirs, when the caller knows it)."""
    layout = layout or layout_of(tensors)
    split = None if accelerator_path(layout.device) else _size_split(layout)
    if split is None:
        return _foreach_norm_and_absmax(tensors, layout)
    if not split.large:  # all small (in input order): nothing to reorder
        return _flat_norm_and_absmax(tensors, split.small_layout)
    large = _foreach_norm_and_absmax([tensors[i] for i in split.large], split.large_layout)
    small = _flat_norm_and_absmax([tensors[i] for i in split.small], split.small_layout)
    return torch.cat([large, small], 1).index_select(1, split.order)


def _foreach_norm_and_absmax(tensors: Sequence[Tensor], layout: Layout | None = None) -> Tensor:
    layout = layout or layout_of(tensors)
    results = []
    for group in layout.groups:
        members = group.tensors(tensors)
        # float32 accumulation, or float64's own (a float64 tensor cannot be narrowed to it).
        accumulate = None if group.dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(members, 2, dtype=accumulate)
        results.append(torch.stack([*norms, *_absmax(members)]).view(2, len(members)).float())
    return layout.columns(results, 0.0, torch.float32, 2)


# On the CPU path a multi-tensor op spends a few microseconds of dispatch per tensor, more than
# the arithmetic on a small one: tensors up to this size are measured from their chunks' flat copies.
SMALL_TENSOR = 1 << 12


@dataclass(frozen=True)
class _SizeSplit:
    small: tuple[int, ...]  # positions of the small (non-empty) tensors
    large: tuple[int, ...]  # the others (None and empty ones too)
    order: Tensor  # columns of cat(large results, small results) in input order
    small_layout: Layout
    large_layout: Layout


def _size_split(layout: Layout) -> _SizeSplit | None:
    """Which tensors take the flat path (kept with the layout); None when fewer than two would."""
    if "size_split" not in layout.derived:
        keys = layout.keys
        small = tuple(i for i, key in enumerate(keys) if key is not None and 0 < key[2] <= SMALL_TENSOR)
        split = None
        if len(small) >= 2:
            large = tuple(i for i in range(len(keys)) if i not in set(small))
            column = {position: c for c, position in enumerate(large + small)}
            split = _SizeSplit(
                small,
                large,
                torch.tensor([column[i] for i in range(len(keys))], dtype=torch.int64),
                Layout(tuple(keys[i] for i in small), layout.chunk_elements),
                Layout(tuple(keys[i] for i in large), layout.chunk_elements),
            )
        layout.derived["size_split"] = split
    kept: _SizeSplit | None = layout.derived["size_split"]
    return kept


def _flat_norm_and_absmax(tensors: Sequence[Tensor], layout: Layout) -> Tensor:
    """float32 [2, n] of non-empty CPU tensors (``layout`` theirs) from their chunks' flat copies:
    squares summed per segment in float64 (one index_add), abs-maxima by one scatter_reduce (which
    propagates NaN, as the sum does), both written into one [2, segments] result. Few ops: after a
    backward the caches are cold and every op costs several microseconds here."""
    results = []
    for group in layout.groups:
        members = group.tensors(tensors)
        sums, maxima = [], []
        for chunk in group.chunks:
            flat, ids = chunk.read_by_shape(members, INPUT)
            wide = flat.to(torch.float64)
            both = wide.new_zeros((2, len(chunk.pieces)))
            total, largest = both.unbind()  # row views (one op; iterating a tensor costs more)
            total.index_add_(0, ids, wide * wide)
            largest.scatter_reduce_(0, ids, wide.abs_() if wide is not flat else wide.abs(), "amax", include_self=False)
            sums.append(total)
            maxima.append(largest)
        total, largest = group.per_member(sums, "sum"), group.per_member(maxima, "amax")
        total.sqrt_()
        # One chunk of whole members: its rows are the members' already (no stacking op).
        whole = len(sums) == 1 and total is sums[0] and largest is maxima[0]
        results.append((both if whole else torch.stack([total, largest])).float())
    return layout.columns(results, 0.0, torch.float32, 2)


@torch.no_grad()
def grad_norms(grads: Sequence[Tensor], multiplier: Multiplier = None, layout: Layout | None = None) -> Tensor:
    """float32 [2, n]: row 0 = L2 norm, row 1 = abs-max, of each grad times ``multiplier``
    (``layout``: the grads' :func:`~numwatch.kernels.chunks.layout_of`, when the caller keeps it).

    ``multiplier`` is the factor that unscales stored gradients (e.g. 1/S for a fused
    optimizer whose ``.grad`` is still scaled); None means 1. Norms are accumulated in
    float32. NaN/Inf propagate: a grad holding NaN has NaN norm and NaN abs-max.
    """
    stats = _l2_norm_and_absmax(grads, layout)
    # ||m*g|| = |m|*||g|| and max|m*g| = |m|*max|g|: scale the 2n results, not every element.
    if multiplier is None:
        return stats
    factor = _as_factor(multiplier, stats.device)
    return stats * (factor.abs() if isinstance(factor, Tensor) else abs(factor))


@torch.no_grad()
def nonfinite_counts(grads: Sequence[Tensor]) -> Tensor:
    """int64 [2, n]: NaN count (row 0) and ±Inf count (row 1) of each tensor."""
    layout = layout_of(grads)
    results = []
    for group in layout.groups:
        members = group.tensors(grads)
        per_chunk = []
        # float64 keeps its own bits (its large finite values overflow float32); the rest widen to float32 exactly.
        wide = torch.float64 if group.dtype == torch.float64 else torch.float32
        inf = _IEEE_LAYOUTS[wide].inf_pattern
        cuts = _Cuts(wide, (inf - 1, inf))  # finite, ±Inf, NaN
        for chunk in group.chunks:
            per_chunk.append(_bucket_counts(chunk, chunk.into(members, INPUT, wide), cuts, WORK))
        counts = group.per_member(per_chunk, "sum")
        results.append(counts.index_select(1, _constant((2, 1), torch.int64, group.device)))
    return layout.assemble(results, 0, torch.int64, (2,)).t()


def _float32_at_most(value: float) -> float:
    """The largest float32 <= ``value`` (``value`` >= 0; the float32 max beyond its range)."""
    largest = float(torch.finfo(torch.float32).max)
    if value >= largest:
        return largest
    nearest = float(struct.unpack("<f", struct.pack("<f", value))[0])
    if nearest <= value:
        return nearest
    (bits,) = struct.unpack("<I", struct.pack("<f", nearest))
    return float(struct.unpack("<f", struct.pack("<I", bits - 1))[0])


def _float32_below(value: float) -> float:
    """The largest float32 < ``value`` (``value`` > 0)."""
    at_most = _float32_at_most(value)
    if at_most < value:
        return at_most
    (bits,) = struct.unpack("<I", struct.pack("<f", at_most))
    return float(struct.unpack("<f", struct.pack("<I", bits - 1))[0])


@functools.cache
def _format_limits(fmt: FormatSpec) -> tuple[float, float, float, float, float]:
    """float32 limits L0..L4 on |x| with: zero |x| <= L0; underflow L0 < |x| <= L1;
    subnormal L1 < |x| <= L2; normal L2 < |x| <= L3; overflow L3 < |x| <= L4 (finite).

    They reproduce a round-to-nearest-even cast of the float32 x to ``fmt``:
    - underflow: |x| <= smallest_subnormal / 2 (the tie rounds to the even 0);
    - subnormal: |x| < smallest_normal - smallest_subnormal / 2 (the tie rounds up to the
      even smallest normal);
    - overflow: |x| >= max + ulp(max) / 2 (max has an odd last bit: the tie rounds to Inf);
      for formats without Inf, whose casts saturate, |x| > max.
    For the fp32 target the underflow and overflow ranges come out empty, as they must.
    """
    half_subnormal = fmt.smallest_subnormal / 2
    if fmt.has_inf:
        _, exponent = math.frexp(fmt.max)  # max = m * 2**exponent with m in [0.5, 1)
        ulp_of_max = math.ldexp(torch.finfo(fmt.dtype).eps, exponent - 1)
        last_normal = _float32_below(fmt.max + ulp_of_max / 2)
    else:
        last_normal = _float32_at_most(fmt.max)
    return (
        0.0,
        _float32_at_most(half_subnormal),
        _float32_below(fmt.smallest_normal - half_subnormal),
        last_normal,
        _float32_at_most(math.inf),
    )


def _float_bits(value: float) -> int:
    """The bit pattern of a float32 value, as a signed int32."""
    return int(struct.unpack("<i", struct.pack("<f", value))[0])


# Buckets of |x| between the limits: zero, underflow, subnormal, normal, overflow, non-finite.
_FORMAT_CODES = 6
_FORMAT_COLUMNS = (0, 1, 2, 4)  # the counted ones, in numwatch.protocol.FORMAT_COUNT_STATS order


def _format_values(chunk: Chunk, members: list[Tensor], scale: Tensor | float | None, slot: int) -> Tensor:
    """x = element * scale of a chunk, formed in float32, in scratch ``slot`` (a writable temporary)."""
    x = chunk.into(members, slot, torch.float32)
    return x if scale is None else x.mul_(scale)


@functools.cache
def _format_cuts(fmt: FormatSpec) -> _Cuts:
    return _Cuts(torch.float32, tuple(_float_bits(limit) for limit in _format_limits(fmt)))


def _on_group_device(factor: Tensor | float | None, device: torch.device) -> Tensor | float | None:
    return factor.to(device, non_blocking=True) if isinstance(factor, Tensor) else factor


@torch.no_grad()
def format_counts(grads: Sequence[Tensor], fmt: FormatSpec, multiplier: Multiplier = None) -> Tensor:
    """int64 [4, n]: rows zeros, underflow, subnormal, overflow (numwatch.protocol.FORMAT_COUNT_STATS)
    of x = grad * multiplier (the loss scale S the format sees) against ``fmt``.

    Defined by what a cast does: zeros: x == 0; underflow: x != 0 but x.to(fmt.dtype) == 0;
    subnormal: the cast is non-zero but below fmt.smallest_normal; overflow: x finite but the
    cast is ±Inf (for formats without Inf, |x| > fmt.max). NaN/Inf elements count in none.
    x is formed in float32; the limits reproduce round-to-nearest-even exactly, so the
    counts equal those of the literal cast ``x.to(fmt.dtype)``, for any multiplier.

    For non-negative floats the order of the bit patterns is the order of the values, so
    |x|'s bits between the limits' bits classify every element exactly (:func:`_bucket_counts`).
    """
    layout = layout_of(grads)
    factor = None if multiplier is None else _as_factor(multiplier, layout.device)
    results = []
    for group in layout.groups:
        members = group.tensors(grads)
        scale = _on_group_device(factor, group.device)
        per_chunk = [
            _bucket_counts(chunk, _format_values(chunk, members, scale, INPUT), _format_cuts(fmt), WORK)
            for chunk in group.chunks
        ]
        results.append(_counted_formats(group.per_member(per_chunk, "sum")))
    return _format_rows(layout, results)


def _counted_formats(codes: Tensor) -> Tensor:
    """[4, k] of the counted buckets from per-member bucket counts [k, 6]."""
    return codes.t().index_select(0, _constant(_FORMAT_COLUMNS, torch.int64, codes.device))


def _format_rows(layout: Layout, per_group: list[Tensor]) -> Tensor:
    return layout.columns(per_group, 0, torch.int64, len(_FORMAT_COLUMNS))


# --------------------------------------------------------------------------- histograms


@dataclass(frozen=True)
class _IeeeLayout:
    """Bit layout of a binary floating-point dtype, read through an integer view."""

    int_dtype: torch.dtype  # same-width integer view
    mantissa_bits: int
    exponent_bits: int
    log2_dtype: torch.dtype  # float type that holds every subnormal mantissa exactly

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def inf_pattern(self) -> int:
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits

    @property
    def magnitude_mask(self) -> int:
        return (1 << (self.exponent_bits + self.mantissa_bits)) - 1


_IEEE_LAYOUTS: dict[torch.dtype, _IeeeLayout] = {
    torch.float16: _IeeeLayout(torch.int16, 10, 5, torch.float32),
    torch.bfloat16: _IeeeLayout(torch.int16, 7, 8, torch.float32),
    torch.float32: _IeeeLayout(torch.int32, 23, 8, torch.float32),
    torch.float64: _IeeeLayout(torch.int64, 52, 11, torch.float64),
}
_SINK_BIN = EXPONENT_BINS  # a scratch bin for unreachable keys, dropped at the end


def _binade_bin(binade: int) -> int:
    """Histogram bin of a binade, clamped into the first/last binade bin."""
    return min(max(binade, EXPONENT_MIN), EXPONENT_MAX) - EXPONENT_MIN


def _log2_field_limit(layout: _IeeeLayout) -> int:
    """The exponent field, in ``layout.log2_dtype``, of the float value 2**mantissa_bits."""
    return _IEEE_LAYOUTS[layout.log2_dtype].bias + layout.mantissa_bits


@functools.cache
def _exponent_bin_tables(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The lookup table from the keys of :func:`_exponent_keys` to histogram bins.

    key = exponent field + log2 field (+1 for NaN), where the log2 field is the exponent
    field of the magnitude bits m, clamped to 2**mantissa_bits, converted to a float: 0 for
    m = 0, bias' + floor(log2 m) for the subnormals (m below 2**mantissa_bits), and the limit
    bias' + mantissa_bits for every other value. So keys up to the limit are zero and the
    subnormal binades (floor(log2 m) + 1 - bias - mantissa_bits), and keys above it are the
    exponent fields of normal values (binade field - bias), then Inf, then NaN.
    """
    layout = _IEEE_LAYOUTS[dtype]
    log2_bias = _IEEE_LAYOUTS[layout.log2_dtype].bias
    limit = _log2_field_limit(layout)
    top_field = (1 << layout.exponent_bits) - 1
    table = [_SINK_BIN] * (limit + top_field + 2)  # unreachable keys go to the sink
    table[0] = EXPONENT_ZERO_BIN
    for floor_log2 in range(layout.mantissa_bits):
        table[log2_bias + floor_log2] = _binade_bin(floor_log2 + 1 - layout.bias - layout.mantissa_bits)
    for field in range(1, top_field):
        table[limit + field] = _binade_bin(field - layout.bias)
    table[limit + top_field] = EXPONENT_INF_BIN
    table[limit + top_field + 1] = EXPONENT_NAN_BIN
    return to_device(torch.tensor(table, dtype=torch.int64), device)


def _exponent_keys(flat: Tensor) -> Tensor:
    """The key of each element of an IEEE tensor (see :func:`_exponent_bin_tables`): a few
    integer ops on its bits in place of per-element bin arithmetic, in scratch memory (slots
    WORK to FLAGS; the keys are a writable temporary there)."""
    layout = _IEEE_LAYOUTS[flat.dtype]
    log2_layout = _IEEE_LAYOUTS[layout.log2_dtype]
    n, device = flat.numel(), flat.device
    magnitude = torch.bitwise_and(
        flat.view(layout.int_dtype), layout.magnitude_mask, out=scratch(n, layout.int_dtype, device, WORK)
    )
    # An integer below 2**mantissa_bits is exact in log2_dtype, whose exponent field is then its
    # floor(log2); larger ones convert to at least 2**mantissa_bits, which the clamp gives them all.
    keys = scratch(n, layout.log2_dtype, device, SECOND).copy_(magnitude).clamp_(max=1 << layout.mantissa_bits)
    keys = keys.view(log2_layout.int_dtype).bitwise_right_shift_(log2_layout.mantissa_bits)
    nan = torch.gt(magnitude, layout.inf_pattern, out=scratch(n, torch.bool, device, FLAGS))
    return keys.add_(magnitude.bitwise_right_shift_(layout.mantissa_bits)).add_(nan)


@torch.no_grad()
def exponent_histogram(tensors: Sequence[Tensor]) -> Tensor:
    """int64 [n, EXPONENT_BINS]: per tensor, counts per binade floor(log2|x|) - EXPONENT_MIN of
    its finite non-zero values (clamped into the first/last binade bin), then zero, ±Inf and
    NaN bins (numwatch.protocol layout). Read from the IEEE exponent bits (no frexp);
    subnormals get their true binade."""
    layout = layout_of(tensors)
    results = []
    for group in layout.groups:
        members = group.tensors(tensors)
        per_chunk = []
        for chunk in group.chunks:
            flat = _widened(chunk.read(members, INPUT))
            table = _exponent_bin_tables(flat.dtype, flat.device)
            per_chunk.append(_segment_counts(chunk, _exponent_keys(flat), table.numel()))
        results.append(_binned(group.per_member(per_chunk, "sum"), table))
    return layout.assemble(results, 0, torch.int64, (EXPONENT_BINS,))


def _binned(by_key: Tensor, table: Tensor) -> Tensor:
    """[k, EXPONENT_BINS] from per-member key counts, folded into the protocol's bins (plus a
    dropped sink) with the lookup table."""
    counts = by_key.new_zeros((by_key.shape[0], EXPONENT_BINS + 1)).index_add_(1, table, by_key)
    return counts[:, :EXPONENT_BINS]


@torch.no_grad()
def format_counts_and_exponent_histogram(
    grads: Sequence[Tensor], fmt: FormatSpec, multiplier: Multiplier = None, histogram_multiplier: Multiplier = None
) -> tuple[Tensor, Tensor]:
    """``format_counts(grads, fmt, multiplier)`` and ``exponent_histogram`` of grads *
    ``histogram_multiplier`` (formed in the grads' dtype, as ``torch._foreach_mul`` does) in
    one pass: each chunk is read once and one count over (segment, exponent key, format
    bucket) keys gives both."""
    layout = layout_of(grads)
    factor = None if multiplier is None else _as_factor(multiplier, layout.device)
    unscale = None if histogram_multiplier is None else _as_factor(histogram_multiplier, layout.device)
    formats, histograms = [], []
    for group in layout.groups:
        members = group.tensors(grads)
        scale, group_unscale = _on_group_device(factor, group.device), _on_group_device(unscale, group.device)
        per_chunk = []
        for chunk in group.chunks:
            flat = chunk.read(members, INPUT)
            values = _widened(flat if group_unscale is None else flat * group_unscale)
            table = _exponent_bin_tables(values.dtype, values.device)
            keys = _exponent_keys(values).mul_(_FORMAT_CODES)  # in slot SECOND: the format codes use two others
            keys.add_(_bucket_codes(_format_values(chunk, members, scale, WORK), _format_cuts(fmt), FLAGS))
            per_chunk.append(
                _segment_counts(chunk, keys, table.numel() * _FORMAT_CODES).view(
                    len(chunk.pieces), table.numel(), _FORMAT_CODES
                )
            )
        joint = group.per_member(per_chunk, "sum")
        formats.append(_counted_formats(joint.sum(1)))
        histograms.append(_binned(joint.sum(2), table))
    counts = _format_rows(layout, formats)
    return counts, layout.assemble(histograms, 0, torch.int64, (EXPONENT_BINS,))


@torch.no_grad()
def finite_ranges(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """float64 [n] (min, max) of each tensor's finite values; NaN for a tensor without any."""
    layout = layout_of(tensors)
    lows, highs = [], []
    for group in layout.groups:
        members = group.tensors(tensors)
        chunk_lows, chunk_highs = [], []
        for chunk in group.chunks:
            flat = _widened(chunk.read(members, INPUT))
            # Non-finite values become -Inf, which no max picks over a finite value.
            work = scratch(flat.numel(), flat.dtype, flat.device, WORK)
            highest = torch.nan_to_num(flat, nan=-math.inf, posinf=-math.inf, neginf=-math.inf, out=work)
            chunk_highs.append(torch.stack(torch._foreach_max(chunk.split(highest))))
            negated_lowest = torch.neg(flat, out=work).nan_to_num_(nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
            chunk_lows.append(torch.stack(torch._foreach_max(chunk.split(negated_lowest))).neg_())
        low = group.per_member(chunk_lows, "amin").double()
        high = group.per_member(chunk_highs, "amax").double()
        none_finite = low > high  # +Inf > -Inf: every value was non-finite
        lows.append(low.masked_fill(none_finite, math.nan))
        highs.append(high.masked_fill(none_finite, math.nan))
    return layout.assemble(lows, math.nan, torch.float64), layout.assemble(highs, math.nan, torch.float64)


@torch.no_grad()
def linear_histogram_counts(tensors: Sequence[Tensor], lows: Tensor, highs: Tensor, bins: int = LINEAR_BINS) -> Tensor:
    """int64 [n, bins]: counts of each tensor's finite values in ``bins`` equal bins over
    [lows[i], highs[i]] (a range that covers them, e.g. the whole tensor's of a shard).

    The bin of x is floor((x - low) / width * bins) in float64, the operation order of
    numpy.histogram, clamped into [0, bins - 1] (high goes in the last bin); a zero-width
    range puts every finite value in bin 0; non-finite values go to a dropped bin."""
    layout = layout_of(tensors)
    results = []
    for group in layout.groups:
        low = group.per_segment(group.select(lows).double())
        high = group.per_segment(group.select(highs).double())
        width = (high - low).masked_fill_(~(high > low), 1.0)
        members = group.tensors(tensors)
        per_chunk = []
        for chunk, chunk_low, chunk_width in zip(
            group.chunks, group.chunk_slices(low), group.chunk_slices(width), strict=True
        ):
            # Non-finite values become NaN, which every step below keeps, and then the dropped bin.
            values = chunk.into(members, WORK, torch.float64).nan_to_num_(
                nan=math.nan, posinf=math.nan, neginf=math.nan
            )
            chunk.per_segment_(values, ("sub", chunk_low), ("div", chunk_width))
            # Clamping before the floor is the same, and for values >= 0 the cast truncates to the floor.
            values.mul_(bins).clamp_(0, bins - 1).nan_to_num_(nan=bins)
            index = scratch(chunk.numel, torch.int32, values.device, INPUT).copy_(values)
            per_chunk.append(_segment_counts(chunk, index, bins + 1))
        results.append(group.per_member(per_chunk, "sum")[:, :bins])
    return layout.assemble(results, 0, torch.int64, (bins,))


# --------------------------------------------------------------------------- weights and optimizer state


@torch.no_grad()
def weight_stats(weights: Sequence[Tensor]) -> Tensor:
    """float32 [2, n]: L2 norm (row 0) and abs-max (row 1) of each weight."""
    return _l2_norm_and_absmax(weights)


@torch.no_grad()
def snapshot(weights: Sequence[Tensor]) -> list[Tensor]:
    """Detached flat copies of the weights, taken before a step for :func:`update_stats`:
    one copy per chunk, and a 1-D view of it per weight."""
    layout = layout_of(weights)
    copies: list[Tensor | None] = [None] * len(weights)
    for group in layout.groups:
        members = group.tensors(weights)
        pieces: dict[int, list[Tensor]] = {}
        for chunk in group.chunks:
            for (member, _, _), view in zip(chunk.pieces, chunk.split(chunk.copy(members)), strict=True):
                pieces.setdefault(member, []).append(view)
        for member, views in pieces.items():
            copies[group.members[member]] = views[0] if len(views) == 1 else torch.cat(views)
    return [weight.detach().clone() if copy is None else copy for weight, copy in zip(weights, copies, strict=True)]


def _bits(tensor: Tensor) -> Tensor:
    """The raw bit pattern of a floating tensor as an integer view (exact equality, NaN == NaN)."""
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.view(int_dtype)


def _gradient_marks(grads: list[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    """Tensors whose non-zero elements are those with grad != 0, all of one dtype: the grads
    themselves when they share one, else (mixed or missing grads, rare) per-tensor masks."""
    present = [grad for grad in grads if grad is not None]
    if len(present) == len(grads) and len({grad.dtype for grad in present}) == 1:
        return present
    return [torch.zeros_like(w, dtype=torch.bool) if g is None else g != 0 for g, w in zip(grads, like, strict=True)]


@torch.no_grad()
def update_stats(before: Sequence[Tensor], after: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """float32 [2, n]: update_ratio = ||after - before|| / ||before|| (0/0 gives 0) and
    stale_fraction = share of elements with grad != 0 whose stored weight did not change
    (a bf16 update below half an ulp), 0 when no element has grad != 0. The difference is
    formed in float32; staleness compares the weights' own bits."""
    if not (len(before) == len(after) == len(grads)):
        raise ValueError(f"before, after and grads differ in length: {len(before)}, {len(after)}, {len(grads)}")
    layout = layout_of(after)
    results = []
    for group in layout.groups:
        olds, news = group.tensors(before), group.tensors(after)
        marks = _gradient_marks([grads[position] for position in group.members], news)
        changes, sizes, with_grads, stales = [], [], [], []
        for chunk in group.chunks:
            old = chunk.flat(olds)  # a view: the snapshot's chunk copy
            work = scratch(chunk.numel, torch.float32, old.device, WORK).copy_(old)
            sizes.append(torch.stack(torch._foreach_norm(chunk.split(work), 2)))
            new = chunk.read(news, INPUT)
            changes.append(torch.stack(torch._foreach_norm(chunk.split(work.copy_(new).sub_(old)), 2)))
            unchanged = torch.eq(_bits(old), _bits(new), out=work)
            has_grad = torch.ne(
                chunk.read(marks, INPUT), 0, out=scratch(chunk.numel, torch.float32, old.device, SECOND)
            )
            # float64: the sums over a cut tensor's segments stay exact.
            with_grads.append(chunk.sums(has_grad).double())
            stales.append(chunk.sums(unchanged.mul_(has_grad)).double())
        change = group.per_member(changes, "norm")
        ratio = (change / group.per_member(sizes, "norm")).masked_fill_(change == 0, 0.0)
        with_grad = group.per_member(with_grads, "sum").float()
        stale = (group.per_member(stales, "sum").float() / with_grad.clamp(min=1)).masked_fill_(with_grad == 0, 0.0)
        results.append(torch.stack([ratio, stale], 1))
    return layout.assemble(results, 0.0, torch.float32, (2,)).t()


@torch.no_grad()
def exp_avg_sq_underflow(states: Sequence[Tensor | None], fmt: FormatSpec) -> Tensor:
    """float32 [n]: share of each Adam ``exp_avg_sq`` that is zero or below
    fmt.smallest_normal; NaN where the state is None (not yet created) or empty."""
    layout = layout_of(states)
    results = []
    for group in layout.groups:
        members = group.tensors(states)
        # Compared in float32: fmt's smallest normal may not exist in a narrower state dtype.
        per_chunk = []
        for chunk in group.chunks:
            work = chunk.into(members, WORK, torch.float32).abs_()
            per_chunk.append(chunk.sums(torch.lt(work, fmt.smallest_normal, out=work)).double())
        results.append(
            group.per_member(per_chunk, "sum").float() / _constant(tuple(group.numels), torch.float32, group.device)
        )
    return layout.assemble(results, math.nan, torch.float32)
