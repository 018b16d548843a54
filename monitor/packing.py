"""Packed per-tensor arrays: one blob per step row, decoded with numpy at read time."""

from __future__ import annotations

import numpy as np

from numwatch.protocol import TENSOR_STATS


def pack_stats(stats: dict[str, bytes]) -> tuple[str, bytes]:
    """(stat_names, blob) for a step row; ``stats`` maps stat name to raw LE bytes."""
    names = [name for name in TENSOR_STATS if name in stats]
    return ",".join(names), b"".join(stats[name] for name in names)


def unpack_stats(stat_names: str, blob: bytes, n_tensors: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_stats`: stat name -> array of ``n_tensors`` values."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name in filter(None, stat_names.split(",")):
        dtype = np.dtype(TENSOR_STATS[name])
        size = dtype.itemsize * n_tensors
        out[name] = np.frombuffer(blob, dtype=dtype, count=n_tensors, offset=offset)
        offset += size
    if offset != len(blob):
        raise ValueError(f"packed stats hold {len(blob)} bytes, expected {offset} for {n_tensors} tensors")
    return out
