"""numwatch.formats: format limits agree with what casts to each dtype actually do."""

from __future__ import annotations

import pytest
import torch

from numwatch.formats import FormatSpec, format_name_for_dtype, format_spec
from numwatch.protocol import FORMATS

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp32": torch.float32,
}


def _cast_to_float64(value: float, dtype: torch.dtype) -> float:
    """Round a float64 value to ``dtype`` (through float32, exact for these inputs) and back."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).double())


@pytest.mark.parametrize("name", FORMATS)
def test_spec_limits_come_from_finfo(name: str) -> None:
    spec = format_spec(name)
    info = torch.finfo(DTYPES[name])
    assert isinstance(spec, FormatSpec)
    assert (spec.name, spec.dtype) == (name, DTYPES[name])
    assert spec.max == info.max
    assert spec.smallest_normal == info.smallest_normal


@pytest.mark.parametrize("name", FORMATS)
def test_smallest_subnormal_is_the_smallest_nonzero_value(name: str) -> None:
    spec = format_spec(name)
    # Representable, and the value with every bit but the lowest mantissa bit clear.
    assert _cast_to_float64(spec.smallest_subnormal, spec.dtype) == spec.smallest_subnormal
    as_bits = torch.tensor(spec.smallest_subnormal, dtype=torch.float32).to(spec.dtype)
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[as_bits.element_size()]
    assert int(as_bits.view(int_view)) == 1
    # Half of it is a tie between 0 (even) and itself (odd): rounds to 0.
    assert _cast_to_float64(spec.smallest_subnormal / 2, spec.dtype) == 0.0


def test_smallest_subnormal_matches_nextafter_where_torch_has_it() -> None:
    for name in ("fp16", "bf16", "fp32"):
        dtype = DTYPES[name]
        zero = torch.zeros((), dtype=dtype)
        assert format_spec(name).smallest_subnormal == float(torch.nextafter(zero, torch.ones((), dtype=dtype)))


@pytest.mark.parametrize("name", FORMATS)
def test_has_inf_matches_an_overflowing_cast(name: str) -> None:
    spec = format_spec(name)
    huge = torch.tensor(torch.finfo(torch.float64).max, dtype=torch.float64)
    cast = huge.to(spec.dtype).float()
    assert bool(torch.isinf(cast)) == spec.has_inf
    if not spec.has_inf:
        assert float(cast) == spec.max  # float8_e4m3fn saturates


def test_bad_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        format_spec("fp12")
    for name in FORMATS:
        assert name in str(excinfo.value)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.float16, "fp16"),
        (torch.bfloat16, "bf16"),
        (torch.float32, "fp32"),
        (torch.float64, "fp32"),
        (torch.float8_e4m3fn, "fp8_e4m3"),
        (torch.float8_e5m2, "fp8_e5m2"),
    ],
)
def test_format_name_for_dtype(dtype: torch.dtype, name: str) -> None:
    assert format_name_for_dtype(dtype) == name
    assert format_spec(format_name_for_dtype(dtype)).name == name


def test_format_name_for_non_float_dtype_raises() -> None:
    with pytest.raises(ValueError, match="int32"):
        format_name_for_dtype(torch.int32)
