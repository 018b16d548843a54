"""Target number formats (fp16, bf16, fp8, fp32) and their limits, all taken from ``torch.finfo``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from numwatch.protocol import FORMATS, Format


@dataclass(frozen=True)
class FormatSpec:
    """A floating-point format gradients are cast to, with the limits that define its counts."""

    name: Format
    dtype: torch.dtype
    max: float
    smallest_normal: float
    smallest_subnormal: float
    has_inf: bool  # False for float8_e4m3fn: its casts saturate instead of overflowing to Inf


_FORMAT_DTYPES: dict[Format, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp32": torch.float32,
}
assert tuple(_FORMAT_DTYPES) == FORMATS, "format table out of step with the wire protocol"

# Formats whose encoding has no Inf: out-of-range casts saturate (or give NaN), never Inf.
_FORMATS_WITHOUT_INF = frozenset({"fp8_e4m3"})

_DTYPE_NAMES: dict[torch.dtype, Format] = {dtype: name for name, dtype in _FORMAT_DTYPES.items()}
_DTYPE_NAMES[torch.float64] = "fp32"  # no wider target format: fp64 tensors are judged against fp32


def _build_spec(name: Format) -> FormatSpec:
    dtype = _FORMAT_DTYPES[name]
    info = torch.finfo(dtype)
    return FormatSpec(
        name=name,
        dtype=dtype,
        max=float(info.max),
        smallest_normal=float(info.smallest_normal),
        # The smallest subnormal is one unit in the last place of the smallest normal.
        smallest_subnormal=float(info.smallest_normal) * float(info.eps),
        has_inf=name not in _FORMATS_WITHOUT_INF,
    )


_SPECS: dict[str, FormatSpec] = {name: _build_spec(name) for name in FORMATS}


def format_spec(name: str) -> FormatSpec:
    """The :class:`FormatSpec` of a wire format name; ValueError naming the valid names otherwise."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None


def format_name_for_dtype(dtype: torch.dtype) -> Format:
    """The wire format name of a floating dtype (float64 maps to 'fp32', the widest target)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        valid = ", ".join(str(d) for d in _DTYPE_NAMES)
        raise ValueError(f"no target format for dtype {dtype}; supported dtypes: {valid}") from None
