"""Per-tensor numeric statistics of gradients, weights and optimizer state.

Every function here runs on the training thread and follows the hot-path rules
(ARCHITECTURE §2): it never synchronises with the device (no ``.item()``, no
Python branch on a tensor value, no data-dependent output sizes), and returns
device tensors with one entry (row or column) per input tensor, in input order.
Branches only look at shapes, dtypes and devices, which the host already knows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hooks.formats import FormatSpec
from hooks.protocol import (
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

    One ``aminmax`` per tensor reads it once and is several times cheaper on CPU
    than ``_foreach_norm(ord=inf)``, which materialises |x| (see benchmarks/stats_pass.py).
    """
    mins, maxs = [], []
    for tensor in tensors:
        if tensor.numel() == 0:
            empty = tensor.new_zeros((), dtype=torch.float32)
            mins.append(empty)
            maxs.append(empty)
            continue
        low, high = torch.aminmax(tensor)
        mins.append(low.float())
        maxs.append(high.float())
    # torch.maximum propagates NaN, so a NaN anywhere in a tensor gives a NaN absmax.
    return torch.maximum(torch.stack(mins).neg(), torch.stack(maxs))


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
        group_absmax = _absmax(members).to(device, non_blocking=True)
        for slot, position in enumerate(positions):
            norms[position] = group_norms[slot].to(device, non_blocking=True)
            absmaxes[position] = group_absmax[slot]
    return torch.stack([torch.stack(norms), torch.stack(absmaxes)])


def _segment_counts(codes: Sequence[Tensor], bins: int, device: torch.device) -> Tensor:
    """int64 [n, bins]: how often each code 0..bins-1 occurs in each tensor of ``codes``.

    All tensors are counted by one histogram call over keys ``code + bins * position``.
    ``torch.bincount`` sizes its output from the data (a sync on accelerators), so
    off the CPU the counts are scattered into a buffer of known size instead.
    """
    n = len(codes)
    if n == 0:
        return torch.zeros((0, bins), dtype=torch.int64, device=device)
    keys = torch.cat([code.reshape(-1).to(device=device, dtype=torch.int64) + bins * position for position, code in enumerate(codes)])
    if device.type == "cpu":
        counts = torch.bincount(keys, minlength=n * bins)
    else:
        counts = torch.zeros(n * bins, dtype=torch.int64, device=device)
        counts.index_add_(0, keys, torch.ones((), dtype=torch.int64, device=device).expand(keys.numel()))
    return counts.view(n, bins)


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
    nan_counts = [torch.isnan(grad).sum().to(device, non_blocking=True) for grad in grads]
    inf_counts = [torch.isinf(grad).sum().to(device, non_blocking=True) for grad in grads]
    return torch.stack([torch.stack(nan_counts), torch.stack(inf_counts)])


@functools.lru_cache(maxsize=64)
def _format_boundaries(fmt: FormatSpec, device: torch.device) -> Tensor:
    """float32 bucket boundaries for |x| such that ``bucketize`` (b[i-1] < |x| <= b[i]) yields
    0 zero, 1 underflow, 2 subnormal, 3 normal, 4 overflow, 5 Inf or NaN, exactly as a
    round-to-nearest-even cast of the float32 value x to ``fmt`` classifies it.

    - underflow: |x| <= smallest_subnormal / 2 (the tie rounds to the even 0).
    - subnormal: below smallest_normal - smallest_subnormal / 2 (the tie rounds up to
      the even smallest normal, so it is not subnormal).
    - overflow: |x| >= max + ulp(max) / 2 (max has an odd last bit: the tie rounds to Inf);
      for formats without Inf (saturating casts), |x| > max.
    Each threshold is exact in float32 for the 16- and 8-bit formats; for the fp32 target
    the underflow and overflow buckets come out empty, as they must.
    Cached per (format, device) so the small host-to-device copy happens once.
    """
    half_subnormal = fmt.smallest_subnormal / 2
    if fmt.has_inf:
        _, exponent = math.frexp(fmt.max)  # max = m * 2**exponent with m in [0.5, 1)
        ulp_of_max = math.ldexp(torch.finfo(fmt.dtype).eps, exponent - 1)
        overflow_limit = fmt.max + ulp_of_max / 2  # the first |x| that casts to Inf
    else:
        overflow_limit = fmt.max  # the last |x| that is not an overflow
    largest_float32 = torch.finfo(torch.float32).max
    # Rounded to float32 by the constructor (to nearest even; beyond the range to Inf).
    limits = torch.tensor([0.0, half_subnormal, fmt.smallest_normal - half_subnormal, overflow_limit, largest_float32], dtype=torch.float32)
    # Bucket edges are inclusive: "|x| below a limit" becomes "|x| <= the float32 just below it".
    below = [2, 3] if fmt.has_inf else [2]
    limits[below] = torch.nextafter(limits[below], torch.zeros(len(below), dtype=torch.float32))
    return limits.to(device)


# Bucket columns (see _format_boundaries) in the order of hooks.protocol.FORMAT_COUNT_STATS.
_FORMAT_COUNT_COLUMNS = [0, 1, 2, 4]
_FORMAT_BUCKETS = 6


def _scaled_float32(grad: Tensor, multiplier: Tensor | float | None) -> Tensor:
    """x = grad * multiplier formed in float32, the precision loss scaling runs in."""
    x = grad.detach().float()
    return x if multiplier is None else x * multiplier


def format_counts(grads: Sequence[Tensor], fmt: FormatSpec, multiplier: Multiplier = None) -> Tensor:
    """int64 [4, n]: rows zeros, underflow, subnormal, overflow (hooks.protocol.FORMAT_COUNT_STATS)
    of x = grad * multiplier (the loss scale S the format sees) against ``fmt``.

    Defined by what a cast does: zeros: x == 0; underflow: x != 0 but x.to(fmt.dtype) == 0;
    subnormal: the cast is non-zero but below fmt.smallest_normal; overflow: x finite but the
    cast is ±Inf (for formats without Inf, |x| > fmt.max). NaN/Inf elements count in none.
    x is formed in float32; thresholds reproduce round-to-nearest-even exactly, so the
    counts equal those of the literal cast ``x.to(fmt.dtype)``.
    """
    device = _result_device(grads)
    boundaries = _format_boundaries(fmt, device)
    factor = None if multiplier is None else _as_factor(multiplier, device)
    codes = [torch.bucketize(_scaled_float32(grad, factor).abs(), boundaries) for grad in grads]
    buckets = _segment_counts(codes, _FORMAT_BUCKETS, device)
    return buckets[:, _FORMAT_COUNT_COLUMNS].t().contiguous()


# --------------------------------------------------------------------------- histograms


# (integer view dtype, mantissa bits, exponent bias) of each IEEE layout read bit by bit.
_IEEE_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float16: (torch.int16, 10, 15),
    torch.bfloat16: (torch.int16, 7, 127),
    torch.float32: (torch.int32, 23, 127),
    torch.float64: (torch.int64, 52, 1023),
}


def _floor_log2_of_small_int(value: Tensor) -> Tensor:
    """floor(log2(v)) for integers 0 < v < 2**24, read from the exponent of float32(v) (exact)."""
    return (value.float().view(torch.int32) >> 23) - 127


def _exponent_bins(tensor: Tensor) -> Tensor:
    """Exponent-histogram bin of every element (hooks.protocol layout), from the IEEE bits."""
    if tensor.dtype not in _IEEE_LAYOUTS:
        # fp8 and other narrow floats widen to float32 exactly; their subnormals become normal.
        tensor = tensor.float()
    int_dtype, mantissa_bits, bias = _IEEE_LAYOUTS[tensor.dtype]
    exponent_bits = torch.finfo(tensor.dtype).bits - 1 - mantissa_bits
    # Work in int32 for 16-bit layouts (room for the bin arithmetic), int64 for float64.
    work_dtype = torch.int64 if int_dtype == torch.int64 else torch.int32
    magnitude = tensor.detach().contiguous().view(int_dtype).to(work_dtype) & ((1 << (exponent_bits + mantissa_bits)) - 1)
    biased_exponent = magnitude >> mantissa_bits
    inf_pattern = ((1 << exponent_bits) - 1) << mantissa_bits
    binade = biased_exponent - bias
    if int_dtype != torch.int64:
        # Subnormals (biased exponent 0): value = mantissa * 2**(1 - bias - mantissa_bits).
        # float64 subnormals lie far below EXPONENT_MIN and clamp into the first bin anyway.
        subnormal_binade = _floor_log2_of_small_int(magnitude) + (1 - bias - mantissa_bits)
        binade = torch.where(biased_exponent == 0, subnormal_binade.to(work_dtype), binade)
    bins = (binade.clamp(EXPONENT_MIN, EXPONENT_MAX) - EXPONENT_MIN).to(torch.int32)
    special = torch.where(magnitude == inf_pattern, EXPONENT_INF_BIN, EXPONENT_NAN_BIN)
    bins = torch.where(magnitude >= inf_pattern, special, bins)
    return torch.where(magnitude == 0, EXPONENT_ZERO_BIN, bins)


def exponent_histogram(tensors: Sequence[Tensor]) -> Tensor:
    """int64 [n, EXPONENT_BINS]: per tensor, counts per binade floor(log2|x|) - EXPONENT_MIN of
    its finite non-zero values (clamped into the first/last binade bin), then zero, ±Inf and
    NaN bins (hooks.protocol layout). Read from the IEEE exponent bits; subnormals get
    their true binade. One histogram call counts all tensors."""
    device = _result_device(tensors)
    return _segment_counts([_exponent_bins(tensor) for tensor in tensors], EXPONENT_BINS, device)


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


def linear_histogram(tensors: Sequence[Tensor], bins: int = LINEAR_BINS) -> tuple[Tensor, Tensor, Tensor]:
    """(min float32 [n], max float32 [n], counts int64 [n, bins]): ``bins`` equal bins over
    [min, max] of each tensor's finite values (torch.histc semantics: the max falls in the
    last bin; when min == max all finite values are in bin 0). min and max are NaN for a
    tensor without finite values, whose counts are all zero."""
    device = _result_device(tensors)
    ranges = [_finite_range(tensor) for tensor in tensors]
    codes = [_linear_bins(tensor, low, high, bins) for tensor, (low, high) in zip(tensors, ranges)]
    counts = _segment_counts(codes, bins + 1, device)[:, :bins].contiguous()
    if not tensors:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return empty, empty.clone(), counts
    lows = torch.stack([low.to(device, non_blocking=True) for low, _ in ranges]).float()
    highs = torch.stack([high.to(device, non_blocking=True) for _, high in ranges]).float()
    return lows, highs, counts


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
    with_grad = has_grad.sum()
    stale = (has_grad & unchanged).sum()
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
    below_normal = (state.detach().abs() < fmt.smallest_normal).sum()
    return (below_normal.float() / state.numel()).to(device, non_blocking=True)


def exp_avg_sq_underflow(states: Sequence[Tensor | None], fmt: FormatSpec) -> Tensor:
    """float32 [n]: share of each Adam ``exp_avg_sq`` that is zero or below
    fmt.smallest_normal; NaN where the state is None (not yet created) or empty."""
    device = _result_device(states)
    if not states:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack([_underflow_share(state, fmt, device) for state in states])
