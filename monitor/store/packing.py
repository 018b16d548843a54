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

Histogram counts (``n_tensors x bins`` int64, row-major) are stored as a code byte, then one
array as above. The code's low two bits name the stored width (``COUNT_DTYPES``: the values'
64 bits narrowed to the smallest that holds them), bit 2 says each row was delta-coded
(``c[i] - c[i-1]`` from 0, zigzag-mapped to unsigned: smooth histograms have small steps), bit 3
that the array is stored column-major (one bin of every tensor, then the next: the exponent bins
no tensor reaches form one long zero run). Each blob takes whichever of the four compresses a
sample of its rows smallest: on the store benchmark's data a histogram step (grad and weight,
300 tensors, bounds included) takes 50,148 bytes instead of 55,950, on histograms of real weights
and gradients 10-11% less (linear bins mostly delta-coded, exponent bins column-major), on
heavy-tailed gradients as before. Codes 0..3 (no filter, row-major) are the blobs stored before
the filters. The arithmetic wraps modulo 2**64, so every int64 array round-trips exactly.

An array that is all zero (NaN/Inf counts, almost always) is named with ``=0`` appended
(:func:`zero_mark`) and takes no bytes. Before step blocks a step row's stats were one blob,
``stat_names`` listing them in ``TENSOR_STATS`` order (:func:`pack_stats`; the migrations read
and write that layout).
"""

from __future__ import annotations

import zlib

import numpy as np

from numwatch.protocol import HISTOGRAM_LENGTHS, TENSOR_STATS, HistogramField

ZERO_SUFFIX = "=0"
# zlib level 1 with run-length matches only: shuffled planes hold runs (the zero high bytes of
# counts) and random bytes, not repeated strings; smaller than the default match search here
# (a step's format counts 2,162 bytes instead of 2,357) and no slower.
LEVEL = 1
STRATEGY = zlib.Z_RLE
# Histogram counts are stored in the narrowest of these that holds them (a count of a 64k-element
# tensor fits 2 bytes, not 8): a quarter of the bytes to compress, the same size compressed.
# Negative counts take all 8 bytes (their two's complement bits).
COUNT_DTYPES = ("<u1", "<u2", "<u4", "<u8")
DELTA, COLUMNS = 4, 8  # code-byte flags above the two bits of the COUNT_DTYPES index
LAYOUTS = (0, DELTA, COLUMNS, DELTA | COLUMNS)
SAMPLE_ROWS = 16


def _planes(raw: bytes, itemsize: int) -> np.ndarray:
    """The byte planes of an array of ``itemsize``-byte elements, one per row."""
    return np.transpose(np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize))


def _unshuffle(shuffled: bytes, itemsize: int) -> bytes:
    return np.transpose(np.frombuffer(shuffled, dtype=np.uint8).reshape(itemsize, -1)).tobytes()


def _blocks(planes: np.ndarray, floating: bool) -> list[np.ndarray]:
    """The planes of one array grouped into deflate blocks: a float's low mantissa bytes (alike: random)
    share one and its sign-and-exponent byte has its own; each byte of an integer has its own."""
    if floating and len(planes) > 1:
        return [planes[:-1], planes[-1:]]
    return [planes[i : i + 1] for i in range(len(planes))]


def compress_arrays(arrays: list[tuple[bytes, np.dtype]], blocks: bool = True) -> bytes:
    """One zlib blob of the shuffled ``(raw bytes, dtype)`` arrays, in order; ``blocks=False``: in one
    deflate block (a third of the time, for blobs where the blocks would save little)."""
    if not arrays:
        return b""
    if not blocks:
        return zlib.compress(b"".join(_planes(raw, dtype.itemsize).tobytes() for raw, dtype in arrays), LEVEL)
    compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 8, STRATEGY)
    deflate_blocks = [
        block for raw, dtype in arrays for block in _blocks(_planes(raw, dtype.itemsize), dtype.kind == "f")
    ]
    parts = []
    for block in deflate_blocks[:-1]:
        parts.append(compressor.compress(block.tobytes()))
        # A block costs a Huffman table and its time; constant planes (zero high bytes) are a few
        # run-length codes in any block.
        if block.size and not (block == block[:, :1]).all():
            parts.append(compressor.flush(zlib.Z_BLOCK))
    return b"".join(parts) + compressor.compress(deflate_blocks[-1].tobytes()) + compressor.flush()


def decompress_arrays(blob: bytes, sizes: list[tuple[int, int]]) -> list[bytes]:
    """Inverse of :func:`compress_arrays` for arrays of ``(n_bytes, itemsize)``; ValueError if they do not add up."""
    data = inflate(blob)
    expected = sum(n for n, _ in sizes)
    if len(data) != expected:
        raise ValueError(f"packed arrays hold {len(data)} bytes, expected {expected}")
    out, offset = [], 0
    for n, itemsize in sizes:
        out.append(_unshuffle(data[offset : offset + n], itemsize))
        offset += n
    return out


def inflate(blob: bytes) -> bytes:
    """The shuffled arrays of a :func:`compress_arrays` blob, concatenated (for :func:`element`)."""
    return zlib.decompress(blob) if blob else b""


def element(shuffled: bytes, offset: int, n: int, itemsize: int, index: int) -> bytes:
    """The bytes of element ``index`` of the shuffled ``n``-element array at ``offset``: one value without
    unshuffling all."""
    return bytes(shuffled[offset + j * n + index] for j in range(itemsize))


def compress_array(raw: bytes, dtype: np.dtype) -> bytes:
    return compress_arrays([(raw, dtype)])


def compress_counts(raw: bytes, row_length: int) -> bytes:
    """Little-endian int64 counts in rows of ``row_length`` bins, compressed: a code byte, then the array
    (module docstring), in the layout smallest on a sample of the rows (the plain one on a tie);
    ValueError if the counts are not whole rows."""
    rows = np.frombuffer(raw, dtype="<i8").reshape(-1, row_length)
    # Tried on a sample of rows: adds ~0.2 ms to a 300-tensor array where trying all four on all rows
    # adds ~1.2 ms, and picks the same layout on the benchmark's and on real tensors' histograms.
    sample = rows[:: len(rows) // SAMPLE_ROWS + 1]
    flags = min(LAYOUTS, key=lambda flags: len(_stored_counts(sample, flags)))
    return _stored_counts(rows, flags)


def _stored_counts(rows: np.ndarray, flags: int) -> bytes:
    """The blob of int64 ``rows`` in the layout of ``flags`` (``DELTA``, ``COLUMNS``)."""
    if flags & DELTA:
        steps = np.diff(rows, axis=1, prepend=0)  # wraps modulo 2**64, as the decoder's cumsum does
        rows = (steps << 1) ^ (steps >> 63)  # zigzag: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ...
    bits = (rows.T if flags & COLUMNS else rows).ravel().view("<u8")
    top = int(bits.max()) if bits.size else 0
    width = next(i for i, dtype in enumerate(COUNT_DTYPES) if top <= np.iinfo(dtype).max)
    dtype = np.dtype(COUNT_DTYPES[width])
    return bytes([flags | width]) + compress_array(bits.astype(dtype).tobytes(), dtype)


def decompress_counts(blob: bytes, row_length: int) -> bytes:
    """Inverse of :func:`compress_counts`: the int64 counts' raw bytes."""
    code = blob[0]
    dtype = np.dtype(COUNT_DTYPES[code & 3])
    bits = np.frombuffer(decompress_array(blob[1:], dtype.itemsize), dtype=dtype).astype("<u8")
    rows = bits.reshape(row_length, -1).T if code & COLUMNS else bits.reshape(-1, row_length)
    if code & DELTA:
        rows = np.cumsum(((rows >> 1) ^ -(rows & 1)).view("<i8"), axis=1)  # un-zigzag, sum the steps
    return np.ascontiguousarray(rows).view("<i8").tobytes()


def decompress_array(blob: bytes, itemsize: int) -> bytes:
    data = zlib.decompress(blob) if blob else b""
    return _unshuffle(data, itemsize)


def zero_mark(name: str, raw: bytes) -> str:
    """``name``, or ``name=0`` when the array ``raw`` is all zero (stored as nothing)."""
    return name + ZERO_SUFFIX if raw.count(0) == len(raw) else name


def pack_stats(stats: dict[str, bytes]) -> tuple[str, bytes]:
    """(stat_names, blob) for a step row; ``stats`` maps stat name to raw LE bytes."""
    names, arrays = [], []
    for name in TENSOR_STATS:
        raw = stats.get(name)
        if raw is None:
            continue
        names.append(zero_mark(name, raw))
        if names[-1] == name:
            arrays.append((raw, np.dtype(TENSOR_STATS[name])))
    return ",".join(names), compress_arrays(arrays)


def unpack_stats(stat_names: str, blob: bytes, n_tensors: int) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_stats`: stat name -> array of ``n_tensors`` values."""
    entries = [name for name in stat_names.split(",") if name]
    stored = [name for name in entries if not name.endswith(ZERO_SUFFIX)]
    sizes = [
        (np.dtype(TENSOR_STATS[name]).itemsize * n_tensors, np.dtype(TENSOR_STATS[name]).itemsize) for name in stored
    ]
    try:
        arrays = dict(zip(stored, decompress_arrays(blob, sizes), strict=True))
    except zlib.error as error:
        raise ValueError(f"packed stats are not a zlib stream: {error}") from None
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        name = entry.removesuffix(ZERO_SUFFIX)
        dtype = np.dtype(TENSOR_STATS[name])
        out[name] = (
            np.zeros(n_tensors, dtype) if entry.endswith(ZERO_SUFFIX) else np.frombuffer(arrays[name], dtype=dtype)
        )
    return out


def compress_histogram_array(name: HistogramField, raw: bytes) -> bytes:
    """A histogram document's array as stored: counts filtered and narrowed (``exponent``, ``linear``),
    bounds as they are."""
    if name in ("exponent", "linear"):
        return compress_counts(raw, HISTOGRAM_LENGTHS[name])
    return compress_array(raw, np.dtype("<f4"))


def decompress_histogram_array(name: HistogramField, blob: bytes) -> bytes:
    return (
        decompress_counts(blob, HISTOGRAM_LENGTHS[name])
        if name in ("exponent", "linear")
        else decompress_array(blob, 4)
    )
