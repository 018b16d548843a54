"""Compressed per-tensor arrays: what the store keeps of a step's stats and of a histogram.

Arrays are byte-shuffled (all first bytes of the elements, then all second bytes, ...)
before zlib: the high bytes of float32 norms and of int64 counts barely vary between
tensors, so shuffled they compress to little while raw they interleave with random low
bytes. Planes of different statistics go to separate deflate blocks, each with its own
Huffman codes (one table shared by a plane of few distinct bytes and planes of random ones
costs every random byte more than 8 bits): a float's sign-and-exponent byte apart from its
mantissa bytes, each byte of an integer apart. A 300-tensor step's two norm arrays take 1,990
bytes instead of 2,167. The blob stays one zlib stream, read by plain ``zlib.decompress``.
The store compresses itself rather than leaving it to the database: PostgreSQL's TOAST
compressor gives up on a value whose first kilobyte does not shrink.

A step's stats are one blob: ``stat_names`` lists the stats in ``TENSOR_STATS`` order, a
name ending in ``=0`` marks an array that is all zero (NaN/Inf counts, almost always) and
takes no bytes in the blob.
"""

from __future__ import annotations

import zlib

import numpy as np

from numwatch.protocol import TENSOR_STATS

ZERO_SUFFIX = "=0"
# zlib level 1 with run-length matches only: shuffled planes hold runs (the zero high bytes of
# counts) and random bytes, not repeated strings; smaller than the default match search here
# (a step's format counts 2,162 bytes instead of 2,357) and no slower.
LEVEL = 1
STRATEGY = zlib.Z_RLE
# Histogram counts are stored in the narrowest of these that holds them (a count of a 64k-element
# tensor fits 2 bytes, not 8): a quarter of the bytes to compress, the same size compressed.
COUNT_DTYPES = ("<u1", "<u2", "<u4", "<i8")


def _planes(raw: bytes, itemsize: int) -> np.ndarray:
    """The byte planes of an array of ``itemsize``-byte elements, one per row."""
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T


def _unshuffle(shuffled: bytes, itemsize: int) -> bytes:
    return np.frombuffer(shuffled, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def _blocks(planes: np.ndarray, floating: bool) -> list[np.ndarray]:
    """The planes of one array grouped into deflate blocks: a float's low mantissa bytes (alike: random)
    share one and its sign-and-exponent byte has its own; each byte of an integer has its own."""
    if floating and len(planes) > 1:
        return [planes[:-1], planes[-1:]]
    return [planes[i:i + 1] for i in range(len(planes))]


def compress_arrays(arrays: list[tuple[bytes, np.dtype]], blocks: bool = True) -> bytes:
    """One zlib blob of the shuffled ``(raw bytes, dtype)`` arrays, in order; ``blocks=False``: in one
    deflate block (a third of the time, for blobs where the blocks would save little)."""
    if not arrays:
        return b""
    if not blocks:
        return zlib.compress(b"".join(_planes(raw, dtype.itemsize).tobytes() for raw, dtype in arrays), LEVEL)
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 8, STRATEGY)
    blocks = [block for raw, dtype in arrays for block in _blocks(_planes(raw, dtype.itemsize), dtype.kind == "f")]
    parts = []
    for block in blocks[:-1]:
        parts.append(compressor.compress(block.tobytes()))
        # A block costs a Huffman table and its time; constant planes (zero high bytes) are a few
        # run-length codes in any block.
        if block.size and not (block == block[:, :1]).all():
            parts.append(compressor.flush(zlib.Z_BLOCK))
    return b"".join(parts) + compressor.compress(blocks[-1].tobytes()) + compressor.flush()


def decompress_arrays(blob: bytes, sizes: list[tuple[int, int]]) -> list[bytes]:
    """Inverse of :func:`compress_arrays` for arrays of ``(n_bytes, itemsize)``; ValueError if they do not add up."""
    data = inflate(blob)
    expected = sum(n for n, _ in sizes)
    if len(data) != expected:
        raise ValueError(f"packed arrays hold {len(data)} bytes, expected {expected}")
    out, offset = [], 0
    for n, itemsize in sizes:
        out.append(_unshuffle(data[offset:offset + n], itemsize))
        offset += n
    return out


def inflate(blob: bytes) -> bytes:
    """The shuffled arrays of a :func:`compress_arrays` blob, concatenated (for :func:`element`)."""
    return zlib.decompress(blob) if blob else b""


def element(shuffled: bytes, offset: int, n: int, itemsize: int, index: int) -> bytes:
    """The bytes of element ``index`` of the shuffled ``n``-element array at ``offset``: one value without unshuffling all."""
    return bytes(shuffled[offset + j * n + index] for j in range(itemsize))


def compress_array(raw: bytes, dtype: np.dtype) -> bytes:
    return compress_arrays([(raw, dtype)])


def compress_counts(raw: bytes) -> bytes:
    """Little-endian int64 counts, compressed: a byte naming the stored dtype (``COUNT_DTYPES``), then the array."""
    counts = np.frombuffer(raw, dtype="<i8")
    code = len(COUNT_DTYPES) - 1
    if counts.size == 0 or counts.min() >= 0:
        top = int(counts.max()) if counts.size else 0
        code = next(i for i, dtype in enumerate(COUNT_DTYPES) if top <= np.iinfo(dtype).max)
    dtype = np.dtype(COUNT_DTYPES[code])
    return bytes([code]) + compress_array(counts.astype(dtype).tobytes(), dtype)


def decompress_counts(blob: bytes) -> bytes:
    """Inverse of :func:`compress_counts`: the int64 counts' raw bytes."""
    dtype = np.dtype(COUNT_DTYPES[blob[0]])
    return np.frombuffer(decompress_array(blob[1:], dtype.itemsize), dtype=dtype).astype("<i8").tobytes()


def decompress_array(blob: bytes, itemsize: int) -> bytes:
    data = zlib.decompress(blob) if blob else b""
    return _unshuffle(data, itemsize)


def pack_stats(stats: dict[str, bytes]) -> tuple[str, bytes]:
    """(stat_names, blob) for a step row; ``stats`` maps stat name to raw LE bytes."""
    names, arrays = [], []
    for name in TENSOR_STATS:
        raw = stats.get(name)
        if raw is None:
            continue
        if raw.count(0) == len(raw):
            names.append(name + ZERO_SUFFIX)
        else:
            names.append(name)
            arrays.append((raw, np.dtype(TENSOR_STATS[name])))
    return ",".join(names), compress_arrays(arrays)


def unpack_stats(stat_names: str, blob: bytes, n_tensors: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_stats`: stat name -> array of ``n_tensors`` values."""
    entries = [name for name in stat_names.split(",") if name]
    stored = [name for name in entries if not name.endswith(ZERO_SUFFIX)]
    sizes = [(np.dtype(TENSOR_STATS[name]).itemsize * n_tensors, np.dtype(TENSOR_STATS[name]).itemsize) for name in stored]
    try:
        arrays = dict(zip(stored, decompress_arrays(blob, sizes)))
    except zlib.error as error:
        raise ValueError(f"packed stats are not a zlib stream: {error}") from None
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        name = entry.removesuffix(ZERO_SUFFIX)
        dtype = np.dtype(TENSOR_STATS[name])
        out[name] = np.zeros(n_tensors, dtype) if entry.endswith(ZERO_SUFFIX) else np.frombuffer(arrays[name], dtype=dtype)
    return out


def compress_histogram_array(name: str, raw: bytes) -> bytes:
    """A histogram document's array as stored: counts narrowed (``exponent``, ``linear``), bounds as they are."""
    return compress_counts(raw) if name in ("exponent", "linear") else compress_array(raw, np.dtype("<f4"))


def decompress_histogram_array(name: str, blob: bytes) -> bytes:
    return decompress_counts(blob) if name in ("exponent", "linear") else decompress_array(blob, 4)
