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


def _result_device(tensors: Sequence[Tensor | None]) -> torch.device:
    """Where results live: the device of the first tensor (CPU for an empty list)."""
    for tensor in tensors:
        if tensor is not None:
            return tensor.device
    return torch.device("cpu")


def _groups(tensors: Sequence[Tensor]) -> list[tuple[list[int], list[Tensor]]]:
    """Positions and tensors grouped by (device, dtype), as the fused foreach kernels need."""
    grouped: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[Tensor]]] = {}
    for position, tensor in enumerate(tensors):
        positions, members = grouped.setdefault((tensor.device, tensor.dtype), ([], []))
        positions.append(position)
        members.append(tensor)
    return list(grouped.values())


def _as_factor(multiplier: Tensor | float, device: torch.device) -> Tensor | float:
    """A multiplier as a float32 tensor on ``device`` (no sync: it stays a tensor) or a Python float."""
    if isinstance(multiplier, Tensor):
        return multiplier.detach().to(device=device, dtype=torch.float32, non_blocking=True)
    return float(multiplier)


def _absmax(tensors: list[Tensor]) -> Tensor:
    """float32 [k]: max |x| of each tensor; NaN propagates.

    On CPU one ``aminmax`` per tensor reads it once and is several times cheaper than
    ``_foreach_norm(ord=inf)``, which materialises |x| (see benchmarks/stats_pass.py). On
    CUDA the per-tensor launches dominate instead (~3 per tensor), so one multi-tensor
    kernel does it.
    """
    if tensors and tensors[0].device.type == "cuda":
        return torch.stack(torch._foreach_norm(tensors, math.inf, dtype=torch.float32))
    mins, maxs = [], []
    for tensor in tensors:
        if tensor.numel() == 0:
            empty = tensor.new_zeros(())
            mins.append(empty)
            maxs.append(empty)
            continue
        low, high = torch.aminmax(tensor)
        mins.append(low)
        maxs.append(high)
    # torch.maximum propagates NaN, so a NaN anywhere in a tensor gives a NaN absmax.
    return torch.maximum(torch.stack(mins).neg(), torch.stack(maxs)).float()


def _l2_norm_and_absmax(tensors: Sequence[Tensor]) -> Tensor:
    """float32 [2, n]: L2 norm (accumulated in float32) and abs-max of each tensor."""
    device = _result_device(tensors)
    n = len(tensors)
    if n == 0:
        return torch.zeros((2, 0), dtype=torch.float32, device=device)
    norms: list[Tensor | None] = [None] * n
    absmaxes: list[Tensor | None] = [None] * n
    for positions, members in _groups(tensors):
        group_norms = torch._foreach_norm(members, 2, dtype=torch.float32)
        group_absmax = _absmax(members).unbind()
        if members[0].device != device:  # model parallel: gather the results on one device
            group_norms = [norm.to(device, non_blocking=True) for norm in group_norms]
            group_absmax = [absmax.to(device, non_blocking=True) for absmax in group_absmax]
        for slot, position in enumerate(positions):
            norms[position] = group_norms[slot]
            absmaxes[position] = group_absmax[slot]
    return torch.stack([torch.stack(norms), torch.stack(absmaxes)])


def _count_values(codes: Tensor, bins: int) -> Tensor:
    """int64 [bins]: how often each integer 0..bins-1 occurs in ``codes`` (no other values occur).

    ``torch.bincount`` sizes its output from the data, a sync on accelerators. Off the CPU,
    ``torch.histc`` with a fixed range counts instead: no sync, and per-block privatised
    counters (an index_add_ of ones serialises on atomics when most values share a few
    bins: 250 ms per histogram step of a 100M-parameter model on an H100). Integer codes are
    exact in float64, and so are counts up to 2**53.
    """
    flat = codes.reshape(-1)
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=bins)
    return _histc_count(flat, bins)


def _histc_count(flat: Tensor, bins: int) -> Tensor:
    """int64 [bins]: counts of the integers 0..bins-1 in 1-D ``flat`` by histc over [0, bins) (no sync)."""
    return torch.histc(flat.to(torch.float64), bins=bins, min=0, max=bins).to(torch.int64)


def _stack_rows(rows: list[Tensor], width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, width] from n per-tensor rows ([0, width] for none)."""
    if not rows:
        return torch.zeros((0, width), dtype=dtype, device=device)
    return torch.stack([row.to(device, non_blocking=True) for row in rows])


# --------------------------------------------------------------------------- gradients


def grad_norms(grads: Sequence[Tensor], multiplier: Multiplier = None) -> Tensor:
    """float32 [2, n]: row 0 = L2 norm, row 1 = abs-max, of each grad times ``multiplier``.

    ``multiplier`` is the factor that unscales stored gradients (e.g. 1/S for a fused
    optimizer whose ``.grad`` is still scaled); None means 1. Norms are accumulated in
    float32. NaN/Inf propagate: a grad holding NaN has NaN norm and NaN abs-max.
    """
    stats = _l2_norm_and_absmax(grads)
    # ||m*g|| = |m|*||g|| and max|m*g| = |m|*max|g|: scale the 2n results, not every element.
    if multiplier is None:
        return stats
    return stats * abs(_as_factor(multiplier, stats.device))


def nonfinite_counts(grads: Sequence[Tensor]) -> Tensor:
    """int64 [2, n]: NaN count (row 0) and ±Inf count (row 1) of each tensor."""
    device = _result_device(grads)
    if not grads:
        return torch.zeros((2, 0), dtype=torch.int64, device=device)
    nan_counts = [torch.count_nonzero(torch.isnan(grad)).to(device, non_blocking=True) for grad in grads]
    inf_counts = [torch.count_nonzero(torch.isinf(grad)).to(device, non_blocking=True) for grad in grads]
    return torch.stack([torch.stack(nan_counts), torch.stack(inf_counts)])


def _float32_at_most(value: float) -> float:
    """The largest float32 <= ``value`` (``value`` >= 0; the float32 max beyond its range)."""
    largest = float(torch.finfo(torch.float32).max)
    if value >= largest:
        return largest
    nearest = struct.unpack("<f", struct.pack("<f", value))[0]
    if nearest <= value:
        return nearest
    (bits,) = struct.unpack("<I", struct.pack("<f", nearest))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


def _float32_below(value: float) -> float:
    """The largest float32 < ``value`` (``value`` > 0)."""
    at_most = _float32_at_most(value)
    if at_most < value:
        return at_most
    (bits,) = struct.unpack("<I", struct.pack("<f", at_most))
    return struct.unpack("<f", struct.pack("<I", bits - 1))[0]


@functools.lru_cache(maxsize=None)
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


def _scaled_float32(grad: Tensor, multiplier: Tensor | float | None) -> Tensor:
    """x = grad * multiplier formed in float32, the precision loss scaling runs in."""
    x = grad.detach().float()
    return x if multiplier is None else x * multiplier


def _format_counts_of(x: Tensor, limits: tuple[float, ...]) -> Tensor:
    """int64 [4]: zeros, underflow, subnormal, overflow of float32 ``x`` given ``_format_limits``.
    NaN and ±Inf fail every ``<=`` test and so count nowhere."""
    magnitude = x.abs()
    at_most = torch.stack([torch.count_nonzero(magnitude <= limit) for limit in limits])
    return torch.cat([at_most[:1], at_most[1:3] - at_most[:2], at_most[4:] - at_most[3:4]])


def format_counts(grads: Sequence[Tensor], fmt: FormatSpec, multiplier: Multiplier = None) -> Tensor:
    """int64 [4, n]: rows zeros, underflow, subnormal, overflow (numwatch.protocol.FORMAT_COUNT_STATS)
    of x = grad * multiplier (the loss scale S the format sees) against ``fmt``.

    Defined by what a cast does: zeros: x == 0; underflow: x != 0 but x.to(fmt.dtype) == 0;
    subnormal: the cast is non-zero but below fmt.smallest_normal; overflow: x finite but the
    cast is ±Inf (for formats without Inf, |x| > fmt.max). NaN/Inf elements count in none.
    x is formed in float32; the limits reproduce round-to-nearest-even exactly, so the
    counts equal those of the literal cast ``x.to(fmt.dtype)``, for any multiplier.
    """
    device = _result_device(grads)
    limits = _format_limits(fmt)
    factor = None if multiplier is None else _as_factor(multiplier, device)
    rows = [_format_counts_of(_scaled_float32(grad, factor), limits) for grad in grads]
    return _stack_rows(rows, 4, torch.int64, device).t().contiguous()


# --------------------------------------------------------------------------- histograms


@dataclass(frozen=True)
class _IeeeLayout:
    """Bit layout of a binary floating-point dtype, read through an integer view."""

    int_dtype: torch.dtype  # same-width integer view
    work_dtype: torch.dtype  # integer type the bits are handled in (room for the bin arithmetic)
    mantissa_bits: int
    exponent_bits: int
    log2_dtype: torch.dtype  # float type that holds every subnormal mantissa exactly

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def inf_pattern(self) -> int:
        return ((1 << self.exponent_bits) - 1) << self.mantissa_bits


_IEEE_LAYOUTS: dict[torch.dtype, _IeeeLayout] = {
    torch.float16: _IeeeLayout(torch.int16, torch.int32, 10, 5, torch.float32),
    torch.bfloat16: _IeeeLayout(torch.int16, torch.int32, 7, 8, torch.float32),
    torch.float32: _IeeeLayout(torch.int32, torch.int32, 23, 8, torch.float32),
    torch.float64: _IeeeLayout(torch.int64, torch.int64, 52, 11, torch.float64),
}
_SINK_BIN = EXPONENT_BINS  # a scratch bin for counts resolved elsewhere, dropped at the end


def _binade_bin(binade: int) -> int:
    """Histogram bin of a binade, clamped into the first/last binade bin."""
    return min(max(binade, EXPONENT_MIN), EXPONENT_MAX) - EXPONENT_MIN


def _log2_field_limit(layout: _IeeeLayout) -> int:
    """The exponent field, in ``layout.log2_dtype``, of the float value 2**mantissa_bits."""
    return _IEEE_LAYOUTS[layout.log2_dtype].bias + layout.mantissa_bits


@functools.lru_cache(maxsize=None)
def _exponent_bin_tables(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The lookup table from the keys of :func:`_exponent_counts` to histogram bins, and the
    correction vector that moves Inf counts out of the NaN bin.

    key = exponent field + log2 field, where the log2 field is the exponent field of the
    magnitude bits m, clamped to 2**mantissa_bits, converted to a float: 0 for m = 0,
    bias' + floor(log2 m) for the subnormals (m below 2**mantissa_bits), and the limit
    bias' + mantissa_bits for every other value. So keys up to the limit are zero and the
    subnormal binades (floor(log2 m) + 1 - bias - mantissa_bits), and keys above it are the
    exponent fields of normal values (binade field - bias), with Inf and NaN at the top.
    """
    layout = _IEEE_LAYOUTS[dtype]
    log2_bias = _IEEE_LAYOUTS[layout.log2_dtype].bias
    limit = _log2_field_limit(layout)
    top_field = (1 << layout.exponent_bits) - 1
    table = [_SINK_BIN] * (limit + top_field + 1)  # unreachable keys go to the sink
    table[0] = EXPONENT_ZERO_BIN
    for floor_log2 in range(layout.mantissa_bits):
        table[log2_bias + floor_log2] = _binade_bin(floor_log2 + 1 - layout.bias - layout.mantissa_bits)
    for field in range(1, top_field):
        table[limit + field] = _binade_bin(field - layout.bias)
    table[limit + top_field] = EXPONENT_NAN_BIN
    inf_correction = [0] * (EXPONENT_BINS + 1)
    inf_correction[EXPONENT_INF_BIN], inf_correction[EXPONENT_NAN_BIN] = 1, -1
    return _to_device(torch.tensor(table, dtype=torch.int64), device), _to_device(torch.tensor(inf_correction, dtype=torch.int64), device)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``, copied from pinned memory on CUDA so the copy does not synchronize."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _exponent_counts(tensor: Tensor) -> Tensor:
    """int64 [EXPONENT_BINS]: exponent histogram of one tensor from its IEEE bits.

    One small histogram of a key per element (see :func:`_exponent_bin_tables`) replaces
    per-element bin arithmetic; a lookup table folds it into the protocol's bins. Inf shares
    its exponent field with NaN and is counted apart.
    """
    if tensor.dtype not in _IEEE_LAYOUTS:
        # fp8 widens to float16 exactly (float8_e4m3fn's NaN stays NaN); its subnormals become normal.
        tensor = tensor.half() if tensor.element_size() == 1 else tensor.float()
    layout = _IEEE_LAYOUTS[tensor.dtype]
    log2_layout = _IEEE_LAYOUTS[layout.log2_dtype]
    key_bins, inf_correction = _exponent_bin_tables(tensor.dtype, tensor.device)
    sign_mask = (1 << (layout.exponent_bits + layout.mantissa_bits)) - 1
    magnitude = tensor.detach().contiguous().view(layout.int_dtype).to(layout.work_dtype) & sign_mask
    # An integer below 2**mantissa_bits is exact in log2_dtype, whose exponent field is then its floor(log2).
    clamped = magnitude.clamp(max=1 << layout.mantissa_bits).to(layout.log2_dtype)
    log2_field = clamped.view(log2_layout.int_dtype) >> log2_layout.mantissa_bits
    keys = (magnitude >> layout.mantissa_bits).add_(log2_field)
    by_key = _count_values(keys, key_bins.numel())
    infinities = torch.count_nonzero(magnitude == layout.inf_pattern)
    counts = torch.zeros(EXPONENT_BINS + 1, dtype=torch.int64, device=tensor.device).index_add_(0, key_bins, by_key)
    return (counts + infinities * inf_correction)[:EXPONENT_BINS]


def exponent_histogram(tensors: Sequence[Tensor]) -> Tensor:
    """int64 [n, EXPONENT_BINS]: per tensor, counts per binade floor(log2|x|) - EXPONENT_MIN of
    its finite non-zero values (clamped into the first/last binade bin), then zero, ±Inf and
    NaN bins (numwatch.protocol layout). Read from the IEEE exponent bits (no frexp);
    subnormals get their true binade."""
    device = _result_device(tensors)
    return _stack_rows([_exponent_counts(tensor) for tensor in tensors], EXPONENT_BINS, torch.int64, device)


def _finite_range(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """float64 (min, max) of the finite values; (NaN, NaN) when there are none."""
    if tensor.numel() == 0:
        nan = torch.full((), math.nan, dtype=torch.float64, device=tensor.device)
        return nan, nan
    values = tensor.detach().double()
    finite = torch.isfinite(values)
    low = torch.where(finite, values, math.inf).amin()
    high = torch.where(finite, values, -math.inf).amax()
    no_finite = low > high
    return low.masked_fill(no_finite, math.nan), high.masked_fill(no_finite, math.nan)


def _linear_bins(tensor: Tensor, low: Tensor, high: Tensor, bins: int) -> Tensor:
    """Bin of each element over ``bins`` equal bins of [low, high] (high goes in the last bin,
    as in torch.histc and numpy.histogram); non-finite elements get the sink bin ``bins``.
    A zero-width range puts every finite value in bin 0."""
    values = tensor.detach().double().reshape(-1)
    width = torch.where(high > low, high - low, 1.0)
    # Same operation order as numpy.histogram, so the two agree to the last rounding.
    index = ((values - low) / width * bins).floor_().clamp_(0, bins - 1)
    index = torch.where(torch.isfinite(values), index, float(bins))
    return index.to(torch.int64)


def finite_ranges(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """float64 [n] (min, max) of each tensor's finite values; NaN for a tensor without any."""
    device = _result_device(tensors)
    if not tensors:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return empty, empty.clone()
    ranges = [_finite_range(tensor) for tensor in tensors]
    lows = torch.stack([low.to(device, non_blocking=True) for low, _ in ranges])
    highs = torch.stack([high.to(device, non_blocking=True) for _, high in ranges])
    return lows, highs


def linear_histogram_counts(tensors: Sequence[Tensor], lows: Tensor, highs: Tensor, bins: int = LINEAR_BINS) -> Tensor:
    """int64 [n, bins]: counts of each tensor's finite values in ``bins`` equal bins over
    [lows[i], highs[i]] (a range that covers them, e.g. the whole tensor's of a shard)."""
    device = _result_device(tensors)
    rows = [_count_values(_linear_bins(tensor, lows[i].to(tensor.device), highs[i].to(tensor.device), bins), bins + 1)[:bins] for i, tensor in enumerate(tensors)]
    return _stack_rows(rows, bins, torch.int64, device)


# --------------------------------------------------------------------------- weights and optimizer state


def weight_stats(weights: Sequence[Tensor]) -> Tensor:
    """float32 [2, n]: L2 norm (row 0) and abs-max (row 1) of each weight."""
    return _l2_norm_and_absmax([weight.detach() for weight in weights])


def snapshot(weights: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies of the weights, taken before a step for :func:`update_stats`."""
    return [weight.detach().clone() for weight in weights]


def _bits(tensor: Tensor) -> Tensor:
    """The raw bit pattern of a floating tensor as an integer view (exact equality, NaN == NaN)."""
    int_dtype = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.detach().contiguous().view(int_dtype)


def _stale_fraction(before: Tensor, after: Tensor, grad: Tensor | None) -> Tensor:
    """Share of elements with grad != 0 whose stored weight kept its exact bits; 0 if none."""
    if grad is None:
        return torch.zeros((), dtype=torch.float32, device=after.device)
    has_grad = grad.detach() != 0
    unchanged = _bits(before) == _bits(after)
    with_grad = torch.count_nonzero(has_grad)
    stale = torch.count_nonzero(has_grad & unchanged)
    return torch.where(with_grad > 0, stale.float() / with_grad.clamp(min=1).float(), 0.0)


def update_stats(before: Sequence[Tensor], after: Sequence[Tensor], grads: Sequence[Tensor | None]) -> Tensor:
    """float32 [2, n]: update_ratio = ||after - before|| / ||before|| (0/0 gives 0) and
    stale_fraction = share of elements with grad != 0 whose stored weight did not change
    (a bf16 update below half an ulp), 0 when no element has grad != 0. The difference is
    formed in float32; staleness compares the weights' own bits."""
    if not (len(before) == len(after) == len(grads)):
        raise ValueError(f"before, after and grads differ in length: {len(before)}, {len(after)}, {len(grads)}")
    device = _result_device(after)
    if not after:
        return torch.zeros((2, 0), dtype=torch.float32, device=device)
    differences = [new.detach().float() - old.float() for old, new in zip(before, after)]
    change = torch.stack(torch._foreach_norm(differences, 2))
    size = torch.stack(torch._foreach_norm([old.float() for old in before], 2))
    ratio = torch.where(change == 0, 0.0, change / size)
    stale = torch.stack([_stale_fraction(old, new, grad) for old, new, grad in zip(before, after, grads)])
    return torch.stack([ratio, stale.to(ratio.device)]).to(device)


def _underflow_share(state: Tensor | None, fmt: FormatSpec, device: torch.device) -> Tensor:
    if state is None or state.numel() == 0:
        return torch.full((), math.nan, dtype=torch.float32, device=device)
    # Compared in float32: fmt's smallest normal may not exist in a narrower state dtype.
    below_normal = torch.count_nonzero(state.detach().float().abs() < fmt.smallest_normal)
    return (below_normal.float() / state.numel()).to(device, non_blocking=True)


def exp_avg_sq_underflow(states: Sequence[Tensor | None], fmt: FormatSpec) -> Tensor:
    """float32 [n]: share of each Adam ``exp_avg_sq`` that is zero or below
    fmt.smallest_normal; NaN where the state is None (not yet created) or empty."""
    device = _result_device(states)
    if not states:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack([_underflow_share(state, fmt, device) for state in states])
