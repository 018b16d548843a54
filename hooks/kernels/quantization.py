"""Quantization readiness per weight tensor: the SQNR each deployment format would give it.

SQNR in dB = 20·log10(‖w‖ / ‖w − Q(w)‖), +inf when Q is exact (an all-zero tensor too),
for four weight-only schemes, each a round trip quantize → dequantize:

* ``int8``: symmetric per output channel (dim 0), scale = abs-max / 127, round half to even.
* ``int4``: symmetric, groups of 128 consecutive elements along the input dimension (the
  rest of each row after dim 0, flattened; a row's last group may be shorter), scale =
  group abs-max / 7, codes in [−8, 7].
* ``nf4``: blocks of 64 consecutive elements of the flattened tensor (the last block may be
  shorter), each scaled by its abs-max and rounded to the nearest of the 16 NormalFloat
  values (:func:`nf4_codebook`; a value exactly between two takes the lower one).
* ``fp8``: float8 e4m3 (fn) with one per-tensor scale amax / 448, as current/delayed
  scaling uses.

Each error is formed on the scaled values, where it is exact in float32: with y = w / s,
w − Q(w) = s·(y − q(y)), and y − q(y) is an exact float32 subtraction (q(y) is within a
factor 2 of y, or 0). The squared errors are summed per row, group or block, times s².

Tensors with fewer than two dimensions (biases, norm gains) are not quantized by these
schemes in practice and report NaN. Follows the hot-path rules of :mod:`numwatch.kernels.stats`:
no host sync, and the work runs in chunks of whole rows or blocks, so the temporaries stay
a few times the chunk size whatever the tensor's size; on the CPU the chunks are small
enough to stay in cache, so each of the few elementwise passes reads cached memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from numwatch.kernels.device import accelerator_path, to_device
from numwatch.protocol import QUANT_SCHEMES

SCHEMES = QUANT_SCHEMES  # the rows of quantization_sqnr
CHUNK = 1 << 16  # elements per pass on the CPU: the temporaries stay in the core's cache
DEVICE_CHUNK = 1 << 22  # on an accelerator: few, large kernels
INT4_GROUP = 128
NF4_BLOCK = 64
FP8_MAX = 448.0
# QLoRA's NormalFloat: 1 − δ with δ = ½(1/30 + 1/32), the outermost quantile of N(0, 1) used.
NF4_OFFSET = 0.9677083
# The nearest-code search looks y ∈ [−1, 1] up in a table of NF4_CELLS equal cells, each
# holding at most one midpoint between codes (they are ≥ 0.04 apart), then compares y with
# that cell's midpoint: two gathers and one comparison, not a binary search per element.
NF4_CELLS = 256


@functools.cache
def nf4_codebook() -> tuple[float, ...]:
    """The 16 NF4 values, built as in the QLoRA paper: 8 quantiles of N(0, 1) for the
    positive half and 7 for the negative (so zero is exact), normalised to [−1, 1]."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return tuple((values / values.abs().max()).tolist())


@functools.cache
def _nf4_host_tables() -> tuple[Tensor, Tensor]:
    """(boundary per cell, float32 [NF4_CELLS + 1]; code value below and above it per cell,
    float32 [2 · (NF4_CELLS + 1)]). y > boundary picks the upper value; a cell without a
    midpoint has boundary 2 (never exceeded), and its upper value is unused.

    The boundaries are the exact float64 midpoints of the float32 codes, rounded down to
    float32 unless exact: for every float32 y, ``y > boundary`` then equals ``y > midpoint``
    taken exactly, so a tie goes to the lower code, as an exact nearest-value search does."""
    codes = torch.tensor(nf4_codebook(), dtype=torch.float32)
    exact = (codes[1:].double() + codes[:-1].double()) / 2
    rounded = exact.float()
    mids = torch.where(rounded.double() > exact, torch.nextafter(rounded, torch.tensor(-math.inf)), rounded)
    half = NF4_CELLS / 2
    boundary = torch.full((NF4_CELLS + 1,), 2.0)
    cells = ((exact + 1) * half).floor().long()
    assert cells.unique().numel() == len(cells), "two NF4 midpoints share a cell"
    # No midpoint within float32 rounding of a cell edge, where (y + 1)·half could land in the neighbour.
    assert (((exact + 1) * half - cells).abs() > 1e-4).all() and (((exact + 1) * half - cells - 1).abs() > 1e-4).all()
    boundary[cells] = mids
    left_edges = torch.arange(NF4_CELLS + 1, dtype=torch.float32) / half - 1
    below = torch.bucketize(left_edges, mids)  # the code at each cell's left edge
    values = torch.stack([codes[below], codes[(below + 1).clamp_(max=len(codes) - 1)]], 1)
    return boundary, values.reshape(-1)


@functools.cache
def _nf4_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    boundary, values = _nf4_host_tables()
    return to_device(boundary, device), to_device(values, device)


def _accumulator(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _chunk_elements(device: torch.device) -> int:
    return DEVICE_CHUNK if accelerator_path(device) else CHUNK


def _row_chunks(weight: Tensor) -> Iterator[Tensor]:
    """float32 chunks of whole rows of the (rows, -1) view."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    per_chunk = max(1, _chunk_elements(weight.device) // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], per_chunk):
        yield rows[start : start + per_chunk].float()


def _flat_chunks(weight: Tensor, multiple: int) -> Iterator[Tensor]:
    """float32 chunks of the flattened tensor, each a whole number of ``multiple`` blocks."""
    flat = weight.detach().reshape(-1)
    step = max(multiple, _chunk_elements(weight.device) // multiple * multiple)
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step].float()


def _absmax(x: Tensor, dim: int | None = None) -> Tensor:
    """max |x| along ``dim`` (kept) of a chunk; of the whole tensor without an |x| temporary.
    (``vector_norm(ord=inf)`` is an order of magnitude slower on the CPU.)"""
    if dim is None:
        low, high = torch.aminmax(x)
        return torch.maximum(-low, high)
    return x.abs().amax(dim=dim, keepdim=True)


def _scale(absmax: Tensor, levels: float) -> Tensor:
    """abs-max / levels, 1 where the abs-max is 0 (all-zero rows quantize exactly either way)."""
    scale = absmax / levels
    return torch.where(scale > 0, scale, 1.0)


def _padded_groups(x: Tensor, size: int) -> Tensor:
    """``x`` (r, c) as (r, ⌈c/size⌉, size), zero-padded (zeros quantize exactly: no error)."""
    pad = (-x.shape[-1]) % size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size)


def _rounding_error(scaled: Tensor) -> Tensor:
    """y − round(y) in place of y. The codes need no clamp: |y| ≤ levels (127 or 7) up to
    float32 rounding, which rounds back to the level, inside [−128, 127] and [−8, 7]."""
    return scaled.sub_(torch.round(scaled))


def _scaled_norm_squared(errors: Tensor, scale: Tensor) -> Tensor:
    """Σ over the last dimension's vectors of (scale · ‖error‖)², ``scale`` one per vector (kept dim)."""
    norms: Tensor = torch.linalg.vector_norm(errors, dim=-1)  # torch.linalg's functions are unannotated
    return norms.mul_(scale.squeeze(-1)).square_().sum()


def _integer_noise(weight: Tensor, accumulate: torch.dtype) -> tuple[Tensor, Tensor]:
    """‖w − Q(w)‖² for int8 per channel and int4 per group, in one pass over the rows: the
    rows' abs-maxima are the maxima of their groups'."""
    noise8 = torch.zeros((), dtype=accumulate, device=weight.device)
    noise4 = torch.zeros((), dtype=accumulate, device=weight.device)
    for rows in _row_chunks(weight):
        groups = _padded_groups(rows, INT4_GROUP)
        group_max = _absmax(groups, -1)
        scale8 = _scale(group_max.amax(dim=1), 127.0)  # (r, 1)
        scale4 = _scale(group_max, 7.0)  # (r, groups, 1)
        noise8 = noise8 + _scaled_norm_squared(_rounding_error(rows / scale8), scale8).to(accumulate)
        noise4 = noise4 + _scaled_norm_squared(_rounding_error(groups / scale4), scale4).to(accumulate)
    return noise8, noise4


def _nf4_error(blocks: Tensor) -> Tensor:
    """y − nf4(y) in place of y = blocks / abs-max (|y| ≤ 1); the blocks' scales are applied by the caller."""
    boundary, values = _nf4_tables(blocks.device)
    flat = blocks.reshape(-1)
    # Truncation is the floor here (y + 1 ≥ 0); the clamp only keeps NaN's integer in the table.
    cell = flat.add(1.0).mul_(NF4_CELLS / 2).to(torch.int32).clamp_(0, NF4_CELLS)
    upper = flat > boundary.index_select(0, cell)
    return blocks.sub_(values.index_select(0, cell.mul_(2).add_(upper)).view_as(blocks))


def _float_noise(weight: Tensor, amax: Tensor, accumulate: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """‖w‖², and ‖w − Q(w)‖² for NF4 and for fp8 with the per-tensor ``amax``, in one pass
    over the flattened tensor."""
    signal = torch.zeros((), dtype=accumulate, device=weight.device)
    nf4 = torch.zeros((), dtype=accumulate, device=weight.device)
    fp8 = torch.zeros((), dtype=accumulate, device=weight.device)
    fp8_scale = _scale(amax.float(), FP8_MAX)
    for flat in _flat_chunks(weight, NF4_BLOCK):
        signal = signal + torch.linalg.vector_norm(flat).to(accumulate).square()
        scaled = flat / fp8_scale
        error = scaled.sub_(scaled.to(torch.float8_e4m3fn).float())
        fp8 = fp8 + (torch.linalg.vector_norm(error) * fp8_scale).to(accumulate).square()
        blocks = _padded_groups(flat.reshape(1, -1), NF4_BLOCK)[0]
        scale = _scale(_absmax(blocks, -1), 1.0)
        nf4 = nf4 + _scaled_norm_squared(_nf4_error(blocks / scale), scale).to(accumulate)
    return signal, nf4, fp8


def tensor_absmax(weights: Sequence[Tensor]) -> Tensor:
    """float32 [n]: max |w| of each weight (0 for an empty one), what fp8 scales by."""
    device = weights[0].device if weights else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float32, device=device)
    maxima = [_absmax(w.detach()).float().to(device, non_blocking=True) if w.numel() else zero for w in weights]
    return torch.stack(maxima) if maxima else torch.zeros(0, dtype=torch.float32, device=device)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, this thread's ops run on one core while inside: each op works on a
    cache-sized chunk, for which forking and joining the intra-op threads costs more than
    it saves, and idle workers spinning between the many small ops take the core from the
    pass (measured 10x slower with 2 threads on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    if accelerator_path(device) or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quantization_sums(weights: Sequence[Tensor], amax: Tensor | None = None) -> Tensor:
    """float64 (float32 where the device has no float64) [1 + len(SCHEMES), n]: ‖w‖², then
    ‖w − Q(w)‖² per scheme in ``SCHEMES`` order, of each weight; NaN for tensors with fewer
    than two dimensions, 0 for empty ones. ``amax`` (float [n]) is the abs-max fp8 scales
    by, when the weights are parts of larger tensors (shards); by default each weight's own."""
    device = weights[0].device if weights else torch.device("cpu")
    accumulate = _accumulator(device)
    nan = torch.full((1 + len(SCHEMES),), math.nan, dtype=accumulate, device=device)
    zero = torch.zeros((1 + len(SCHEMES),), dtype=accumulate, device=device)
    columns = []
    with _one_cpu_thread(device):
        for index, weight in enumerate(weights):
            if weight.dim() < 2 or weight.numel() == 0:
                columns.append(nan if weight.dim() < 2 else zero)
                continue
            tensor_amax = _absmax(weight.detach()) if amax is None else amax[index]
            int8, int4 = _integer_noise(weight, accumulate)
            signal, nf4, fp8 = _float_noise(weight, tensor_amax, accumulate)
            by_scheme = {"int8": int8, "int4": int4, "nf4": nf4, "fp8": fp8}
            columns.append(
                torch.stack([signal, *(by_scheme[scheme] for scheme in SCHEMES)]).to(device, non_blocking=True)
            )
    if not columns:
        return torch.zeros((1 + len(SCHEMES), 0), dtype=accumulate, device=device)
    return torch.stack(columns, dim=1)


def sqnr_from_sums(sums: Tensor) -> Tensor:
    """float32 [len(SCHEMES), n] dB from :func:`quantization_sums` rows; +inf where the error is zero."""
    signal, noise = sums[:1], sums[1:]
    ratio = torch.where(noise == 0, math.inf, signal / noise)  # NaN stays NaN
    return (10.0 * torch.log10(ratio)).float()


def quantization_sqnr(weights: Sequence[Tensor]) -> Tensor:
    """float32 [len(SCHEMES), n]: SQNR in dB of each weight under each scheme (rows in
    ``SCHEMES`` order); NaN for tensors with fewer than two dimensions or no elements."""
    sqnr = sqnr_from_sums(quantization_sums(weights))
    if any(weight.numel() == 0 for weight in weights):
        empty = to_device(torch.tensor([weight.numel() == 0 for weight in weights]), sqnr.device)
        sqnr = sqnr.masked_fill(empty, math.nan)
    return sqnr
