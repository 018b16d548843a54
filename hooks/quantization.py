"""Quantization readiness per weight tensor: the SQNR each deployment format would give it.

SQNR in dB = 20·log10(‖w‖ / ‖w − Q(w)‖), +inf when Q is exact (an all-zero tensor too),
for four weight-only schemes, each a round trip quantize → dequantize in float32:

* ``int8``: symmetric per output channel (dim 0), scale = abs-max / 127, round half to even.
* ``int4``: symmetric, groups of 128 consecutive elements along the input dimension (the
  rest of each row after dim 0, flattened; a row's last group may be shorter), scale =
  group abs-max / 7, codes clamped to [−8, 7].
* ``nf4``: blocks of 64 consecutive elements of the flattened tensor (the last block may be
  shorter), each scaled by its abs-max and rounded to the nearest of the 16 NormalFloat
  values (:func:`nf4_codebook`).
* ``fp8``: float8 e4m3 (fn) with one per-tensor scale amax / 448, as current/delayed
  scaling uses.

Tensors with fewer than two dimensions (biases, norm gains) are not quantized by these
schemes in practice and report NaN. Follows the hot-path rules of :mod:`numwatch.stats`:
no host sync, and the work runs in chunks of whole rows or blocks, so the temporaries stay
a few times ``CHUNK`` elements whatever the tensor's size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from numwatch.protocol import QUANT_SCHEMES

SCHEMES = QUANT_SCHEMES  # the rows of quantization_sqnr
CHUNK = 1 << 22
INT4_GROUP = 128
NF4_BLOCK = 64
FP8_MAX = 448.0
# QLoRA's NormalFloat: 1 − δ with δ = ½(1/30 + 1/32), the outermost quantile of N(0, 1) used.
NF4_OFFSET = 0.9677083


@functools.cache
def nf4_codebook() -> tuple[float, ...]:
    """The 16 NF4 values, built as in the QLoRA paper: 8 quantiles of N(0, 1) for the
    positive half and 7 for the negative (so zero is exact), normalised to [−1, 1]."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return tuple((values / values.abs().max()).tolist())


def _accumulator(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _row_chunks(weight: Tensor) -> Iterator[Tensor]:
    """float32 chunks of whole rows of the (rows, -1) view."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    per_chunk = max(1, CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], per_chunk):
        yield rows[start : start + per_chunk].float()


def _flat_chunks(weight: Tensor, multiple: int) -> Iterator[Tensor]:
    """float32 chunks of the flattened tensor, each a whole number of ``multiple`` blocks."""
    flat = weight.detach().reshape(-1)
    step = max(multiple, CHUNK // multiple * multiple)
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step].float()


def _absmax(x: Tensor, dim: int | None = None) -> Tensor:
    """max |x| along ``dim`` (kept), without an |x| temporary."""
    if dim is None:
        return torch.linalg.vector_norm(x, ord=math.inf)
    return torch.linalg.vector_norm(x, ord=math.inf, dim=dim, keepdim=True)


def _scale(absmax: Tensor, levels: float) -> Tensor:
    """abs-max / levels, 1 where the abs-max is 0 (all-zero rows quantize exactly either way)."""
    scale = absmax / levels
    return torch.where(scale > 0, scale, 1.0)


def _int8(rows: Tensor) -> Tensor:
    scale = _scale(_absmax(rows, 1), 127.0)
    return rows.div(scale).round_().clamp_(-127, 127).mul_(scale)


def _padded_groups(x: Tensor, size: int) -> tuple[Tensor, int]:
    """``x`` (r, c) as (r, ⌈c/size⌉, size), zero-padded; and the pad length."""
    pad = (-x.shape[-1]) % size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size), pad


def _unpad(groups: Tensor, columns: int) -> Tensor:
    return groups.reshape(*groups.shape[:-2], -1)[..., :columns]


def _int4(rows: Tensor) -> Tensor:
    groups, _ = _padded_groups(rows, INT4_GROUP)
    scale = _scale(_absmax(groups, -1), 7.0)
    return _unpad(groups.div(scale).round_().clamp_(-8, 7).mul_(scale), rows.shape[1])


def _nf4(flat: Tensor) -> Tensor:
    blocks, _ = _padded_groups(flat.reshape(1, -1), NF4_BLOCK)
    codebook = torch.tensor(nf4_codebook(), dtype=torch.float32, device=flat.device)
    scale = _scale(_absmax(blocks, -1), 1.0)
    # Nearest code; a value exactly between two codes takes the lower one.
    codes = torch.bucketize(blocks / scale, (codebook[1:] + codebook[:-1]) / 2, out_int32=True)
    return _unpad(codebook[codes].mul_(scale), flat.numel()).reshape(-1)


def _fp8(flat: Tensor, scale: Tensor) -> Tensor:
    return (flat / scale).to(torch.float8_e4m3fn).float().mul_(scale)


def _sqnr(pairs: Iterator[tuple[Tensor, Tensor]], device: torch.device) -> Tensor:
    """dB from (original, dequantized) chunks; +inf when the error is zero. Chunk norms
    come from float32 reductions; their squares add up in float64 where the device has it."""
    accumulate = _accumulator(device)
    signal = torch.zeros((), dtype=accumulate, device=device)
    noise = torch.zeros((), dtype=accumulate, device=device)
    for original, restored in pairs:
        signal = signal + torch.linalg.vector_norm(original).to(accumulate).square()
        noise = noise + torch.linalg.vector_norm(restored.sub_(original)).to(accumulate).square()
    ratio = torch.where(noise > 0, signal / noise, math.inf)
    return (10.0 * torch.log10(ratio)).float()


def _scheme_sqnr(weight: Tensor, scheme: str) -> Tensor:
    device = weight.device
    if scheme in ("int8", "int4"):
        quantize: Callable[[Tensor], Tensor] = _int8 if scheme == "int8" else _int4
        return _sqnr(((rows, quantize(rows)) for rows in _row_chunks(weight)), device)
    if scheme == "nf4":
        return _sqnr(((flat, _nf4(flat)) for flat in _flat_chunks(weight, NF4_BLOCK)), device)
    scale = _scale(_absmax(weight.detach()).float(), FP8_MAX)
    return _sqnr(((flat, _fp8(flat, scale)) for flat in _flat_chunks(weight, 1)), device)


def quantization_sqnr(weights: Sequence[Tensor]) -> Tensor:
    """float32 [len(SCHEMES), n]: SQNR in dB of each weight under each scheme (rows in
    ``SCHEMES`` order); NaN for tensors with fewer than two dimensions or no elements."""
    device = weights[0].device if weights else torch.device("cpu")
    nan = torch.full((len(SCHEMES),), math.nan, dtype=torch.float32, device=device)
    columns = [
        torch.stack([_scheme_sqnr(w, scheme) for scheme in SCHEMES]).to(device, non_blocking=True)
        if w.dim() >= 2 and w.numel() > 0 else nan
        for w in weights
    ]
    if not columns:
        return torch.zeros((len(SCHEMES), 0), dtype=torch.float32, device=device)
    return torch.stack(columns, dim=1)
