"""Hypothesis properties of the bad-input paths: the batch decoder, the packed arrays, the spool reader;
and of the histogram counts' layouts (exact round trip, old blobs).

The collector runs in process (``TestClient(create_app(settings))``, SQLite, auth off) for
speed. Bounded: ``MAX_EXAMPLES`` (150) examples per property, no deadline, derandomized;
the file takes about 30 s on 2 cores.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import tempfile
import zlib
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from numwatch import protocol
from numwatch.delivery.spool import DOCUMENT_KINDS, SpoolWriter, iter_spool, read_entries
from numwatch.monitor.app import create_app, prepare_database
from numwatch.monitor.ingest.schemas import HistogramDocument, StepDocument
from numwatch.monitor.settings import Settings
from numwatch.monitor.store import packing
from numwatch.monitor.store.packing import compress_arrays, pack_stats, unpack_stats
from tests.support.collector_docs import TENSORS, array, batch_doc, run_doc, step_doc, values

MAX_EXAMPLES = 150
N_TENSORS = len(TENSORS)
MODULES = ["encoder", "head"]
BOUNDED = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
JSON_TYPE = {"Content-Type": "application/json"}
_run_numbers = count(1)

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The collector app on a fresh SQLite file, with run ``r1`` (3 tensors, 2 traced modules) registered."""
    settings_ = Settings(database_url=f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'numwatch.db'}", auth="off")
    prepare_database(settings_)
    with TestClient(create_app(settings_), raise_server_exceptions=False) as test_client:
        registered = test_client.post("/api/v1/runs", json={**run_doc(), "modules": MODULES})
        assert registered.status_code == 200, registered.text
        yield test_client


def post_batch(client: TestClient, body: bytes, run: str = "r1") -> int:
    """POST ``body`` as a batch; the status, after checking the server still answers."""
    status = client.post(f"/api/v1/runs/{run}/batches", content=body, headers=JSON_TYPE).status_code
    assert client.get("/healthz").status_code == 200
    return status


# --- the batch decoder never answers 5xx -------------------------------------------------------


@BOUNDED
@given(body=st.binary(max_size=2048))
def test_arbitrary_bytes_are_refused_with_a_4xx(client: TestClient, body: bytes) -> None:
    assert 400 <= post_batch(client, body) < 500


@BOUNDED
@given(document=json_values)
def test_arbitrary_json_values_are_refused_with_a_4xx(client: TestClient, document: Any) -> None:
    assert 400 <= post_batch(client, json.dumps(document).encode()) < 500


def _valid_batch() -> dict[str, Any]:
    step = step_doc(1, activations={"absmax": array([1.0, 2.0], "<f4"), "nonfinite": array([0, 1], "<i8")})
    histogram = {
        "step": 1,
        "kind": "grad",
        "exponent": array([1] * (N_TENSORS * protocol.EXPONENT_BINS), "<i8"),
        "linear_min": array([-1.0] * N_TENSORS, "<f4"),
        "linear_max": array([1.0] * N_TENSORS, "<f4"),
        "linear": array([1] * (N_TENSORS * protocol.LINEAR_BINS), "<i8"),
    }
    event = {"step": 1, "kind": "nonfinite_origin", "time": 1.0, "details": {"tensor": "head.bias"}}
    steps = [{**step, "time": 1.0}, {**step_doc(2), "time": 2.0}]  # fixed: the mutation strategy must be reproducible
    return {**batch_doc(steps=steps, histograms=[histogram], events=[event]), "batch_id": "fuzz"}


def _paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indexes) to a value inside ``document``."""
    paths = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            paths += _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += _paths(value, (*prefix, index))
    return paths


def _container(document: Any, path: tuple) -> Any:
    """The dict or list holding the value at ``path``."""
    for key in path[:-1]:
        document = document[key]
    return document


def _packed(value: Any) -> bytes | None:
    """The raw bytes if ``value`` is packed array text (longer than a short word), else None."""
    if not isinstance(value, str) or len(value) <= 8:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


def _array_variants(text: str, raw: bytes) -> st.SearchStrategy[str]:
    """A packed array cut short, lengthened, cut mid-character or garbled."""
    return st.one_of(
        st.integers(0, max(0, len(raw) - 1)).map(lambda n: protocol.pack_bytes(raw[:n])),
        st.binary(min_size=1, max_size=16).map(lambda extra: protocol.pack_bytes(raw + extra)),
        st.integers(0, max(0, len(text) - 1)).map(lambda n: text[:n]),
        st.text(max_size=30),
    )


@st.composite
def mutated_batches(draw: st.DrawFn) -> bytes:
    """A valid batch with 1-3 values replaced or deleted (packed arrays garbled), maybe damaged bytewise too."""
    batch = _valid_batch()
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(batch)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        container, key = _container(batch, path), path[-1]
        value = container[key]
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            raw = _packed(value)
            container[key] = draw(json_values if raw is None else _array_variants(value, raw))
    body = protocol.dumps(batch)
    if draw(st.booleans()):  # byte-level damage on top: cut, or flip one byte
        position = draw(st.integers(0, len(body) - 1))
        body = (
            body[:position]
            if draw(st.booleans())
            else body[:position] + bytes([body[position] ^ draw(st.integers(1, 255))]) + body[position + 1 :]
        )
    return body


@BOUNDED
@given(body=mutated_batches())
def test_mutated_valid_batches_are_stored_or_refused_never_5xx(client: TestClient, body: bytes) -> None:
    status = post_batch(client, body)
    assert status == 200 or 400 <= status < 500, status


def test_the_unmutated_batch_is_stored(client: TestClient) -> None:
    """The mutation base is valid, so the mutations above start from an accepted batch."""
    assert (
        client.post("/api/v1/runs/r1/batches", content=protocol.dumps(_valid_batch()), headers=JSON_TYPE).status_code
        == 200
    )


# --- the packed-array decoders raise their validation error, nothing else -----------------------


dtypes = st.sampled_from(sorted(set(protocol.TENSOR_STATS.values())))


@BOUNDED
@given(
    text=st.text(max_size=64) | st.binary(max_size=48).map(protocol.pack_bytes),
    dtype=dtypes,
    length=st.none() | st.integers(0, 10),
)
def test_unpack_of_arbitrary_text_returns_whole_values_or_raises_value_error(
    text: str, dtype: str, length: int | None
) -> None:
    itemsize = int(dtype[2:])
    try:
        raw = protocol.check_raw(protocol.unpack_bytes(text), dtype, length)
    except ValueError:
        return
    assert len(raw) % itemsize == 0 and (length is None or len(raw) == length * itemsize)
    assert len(values(text, dtype, length)) == len(raw) // itemsize


@BOUNDED
@given(stat=st.sampled_from(list(protocol.TENSOR_STATS)), raw=st.binary(max_size=40))
def test_documents_with_wrong_array_bytes_fail_validation_with_the_field_named(stat: str, raw: bytes) -> None:
    itemsize = int(protocol.TENSOR_STATS[stat][2:])
    step = {**step_doc(1), "tensors": {stat: protocol.pack_bytes(raw)}}
    histogram = {**_valid_batch()["histograms"][0], "linear": protocol.pack_bytes(raw)}
    if len(raw) % itemsize == 0:
        assert StepDocument.model_validate(step).tensors[stat] == raw  # validated arrays are the decoded bytes
    else:
        with pytest.raises(ValidationError, match=stat):
            StepDocument.model_validate(step)
    if len(raw) % 8:
        with pytest.raises(ValidationError, match="linear"):
            HistogramDocument.model_validate(histogram)


@BOUNDED
@given(raw=st.binary(max_size=64), n_tensors=st.integers(0, 4), stat=st.sampled_from(list(protocol.TENSOR_STATS)))
def test_packed_stats_round_trip_and_the_wrong_size_raises_value_error(raw: bytes, n_tensors: int, stat: str) -> None:
    expected = np.dtype(protocol.TENSOR_STATS[stat]).itemsize * n_tensors
    if len(raw) == expected:
        stat_names, blob = pack_stats({stat: raw})
        assert unpack_stats(stat_names, blob, n_tensors)[stat].tobytes() == raw
    else:
        with pytest.raises(ValueError):
            unpack_stats(stat, compress_arrays([(raw, np.dtype(np.uint8))]), n_tensors)


@BOUNDED
@given(
    n_values=st.integers(0, 2 * N_TENSORS).filter(lambda n: n != N_TENSORS),
    stat=st.sampled_from(list(protocol.TENSOR_STATS)),
)
def test_arrays_not_matching_the_runs_tensor_count_are_422(client: TestClient, n_values: int, stat: str) -> None:
    values = np.arange(n_values, dtype=protocol.TENSOR_STATS[stat])
    step = step_doc(1, tensors={stat: protocol.pack_bytes(values.tobytes())})
    response = client.post(
        "/api/v1/runs/r1/batches", content=protocol.dumps(batch_doc(steps=[step])), headers=JSON_TYPE
    )
    assert response.status_code == 422 and f"tensors.{stat}" in str(response.json()["detail"])


# --- histogram counts round-trip in every layout, old blobs included ---------------------------------

INT64 = np.iinfo(np.int64)
counts_values = (
    st.integers(0, 300)
    | st.integers(INT64.min, INT64.max)
    | st.sampled_from([INT64.min, INT64.max, INT64.min + 1, INT64.max - 1, -1, 0])
)
# Blobs written by the packing before the layouts (code 0..3: u1, u2, u4, 8 bytes), with their counts.
OLD_COUNT_BLOBS = [
    ([[0, 3, 7, 2], [1, 0, 0, 250]], "00780163606667626460f80500014f0108"),
    ([[300, 0], [0, 1]], "017801d2616060048c91818101000171002f"),
    ([[1000, 70000]], "0278017a510010b320400c8c80313000000ac2016e"),
    ([[-5, 2**62, -(2**63)]], "037801facdc000d07f060680fe333000f49f8101a0ff0c0c00fd676000e83f030360ff1d1a006c4c08b5"),
]


def reference_counts(blob: bytes, row_length: int) -> np.ndarray:
    """The counts of a ``compress_counts`` blob, decoded in plain Python from the layout packing.py documents."""
    code, data = blob[0], zlib.decompress(blob[1:])
    width = (1, 2, 4, 8)[code & 3]
    n = len(data) // width
    values = [int.from_bytes(bytes(data[plane * n + i] for plane in range(width)), "little") for i in range(n)]
    n_rows = n // row_length
    rows = [
        [values[c * n_rows + r] if code & 8 else values[r * row_length + c] for c in range(row_length)]
        for r in range(n_rows)
    ]
    if code & 4:  # zigzag-coded steps from 0 along each row
        rows = [list(itertools.accumulate((v >> 1) ^ -(v & 1) for v in row)) for row in rows]
    signed = [[(v + 2**63) % 2**64 - 2**63 for v in row] for row in rows]
    return np.array(signed, dtype=np.int64).reshape(n_rows, row_length)


@BOUNDED
@given(row_length=st.integers(1, 8), n_rows=st.integers(0, 5), data=st.data())
def test_counts_round_trip_exactly_in_every_layout(row_length: int, n_rows: int, data: st.DataObject) -> None:
    counts = np.array(
        data.draw(st.lists(counts_values, min_size=n_rows * row_length, max_size=n_rows * row_length)), dtype="<i8"
    ).reshape(n_rows, row_length)
    for blob in [
        packing.compress_counts(counts.tobytes(), row_length),
        *(packing._stored_counts(counts, layout) for layout in packing.LAYOUTS),
    ]:
        assert np.array_equal(
            np.frombuffer(packing.decompress_counts(blob, row_length), "<i8").reshape(n_rows, row_length), counts
        )
        assert np.array_equal(reference_counts(blob, row_length), counts)


@pytest.mark.parametrize(("rows", "hex_blob"), OLD_COUNT_BLOBS)
def test_blobs_stored_before_the_layouts_decode_unchanged(rows: list[list[int]], hex_blob: str) -> None:
    counts = np.array(rows, dtype="<i8")
    assert packing.decompress_counts(bytes.fromhex(hex_blob), counts.shape[1]) == counts.tobytes()
    assert packing._stored_counts(counts, 0) == bytes.fromhex(hex_blob)  # the plain layout writes them as before


def test_histograms_take_the_filtered_layouts_where_they_are_smaller() -> None:
    rng = np.random.default_rng(0)
    centres, widths = rng.uniform(20, 44, (40, 1)), rng.uniform(5, 15, (40, 1))  # a bell per tensor
    linear = rng.poisson(3000 * np.exp(-(((np.arange(protocol.LINEAR_BINS) - centres) / widths) ** 2))).astype("<i8")
    exponent = np.zeros((40, protocol.EXPONENT_BINS), "<i8")
    exponent[:, 120:135] = rng.integers(0, 5000, (40, 15))  # the same few binades reached by every tensor
    for name, counts, flag in (("linear", linear, packing.DELTA), ("exponent", exponent, packing.COLUMNS)):
        blob = packing.compress_histogram_array(name, counts.tobytes())
        assert blob[0] & flag and len(blob) < len(packing._stored_counts(counts, 0))
        assert np.array_equal(reference_counts(blob, protocol.HISTOGRAM_LENGTHS[name]), counts)
        assert packing.decompress_histogram_array(name, blob) == counts.tobytes()


def test_counts_that_are_not_whole_rows_raise_value_error() -> None:
    with pytest.raises(ValueError):
        packing.compress_counts(np.arange(5, dtype="<i8").tobytes(), 4)


# --- valid batches round-trip -------------------------------------------------------------------


any_float = st.floats(allow_nan=True, allow_infinity=True)
float32s = st.floats(width=32, allow_nan=True, allow_infinity=True)
counts = st.integers(0, 2**62)


# Names the collector stores: valid Unicode without NUL (lone surrogates and NUL are refused with a 422).
storable_names = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=8)


@st.composite
def valid_steps(draw: st.DrawFn, number: int) -> dict[str, Any]:
    """A step with every scalar drawn (NaN and ±Inf included) and a drawn subset of per-tensor stats."""
    stats = draw(
        st.lists(st.sampled_from(list(protocol.TENSOR_STATS)), unique=True, max_size=len(protocol.TENSOR_STATS))
    )
    tensors = {}
    for stat in stats:
        dtype = protocol.TENSOR_STATS[stat]
        tensors[stat] = array(
            draw(st.lists(float32s if dtype == "<f4" else counts, min_size=N_TENSORS, max_size=N_TENSORS)), dtype
        )
    maybe = st.none() | any_float
    return {
        "step": number,
        "time": draw(st.floats(0, 4e9)),
        "skipped": draw(st.booleans()),
        "scale_decision": draw(st.sampled_from([None, *get_args(protocol.ScaleDecision)])),
        **{
            key: protocol.encode_float(draw(maybe))
            for key in ("step_time", "loss", "loss_scale", "new_loss_scale", "global_grad_norm", "headroom_bits")
        },
        "lr": [protocol.encode_float(v) for v in draw(st.lists(any_float, max_size=3))],
        "scalars": {
            k: protocol.encode_float(v) for k, v in draw(st.dictionaries(storable_names, any_float, max_size=3)).items()
        },
        "tensors": tensors,
        "activations": None,
    }


def _same(sent: Any, received: Any) -> bool:
    """Protocol floats equal, NaN equal to NaN (they travel as the string "NaN")."""
    a, b = protocol.decode_float(sent), protocol.decode_float(received)
    return (a is None and b is None) or (
        a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
    )


@BOUNDED
@given(data=st.data())
def test_valid_steps_read_back_equal(client: TestClient, data: st.DataObject) -> None:
    run = f"round-trip-{next(_run_numbers)}"
    assert client.post("/api/v1/runs", json=run_doc(run=run)).status_code == 200
    numbers = data.draw(st.lists(st.integers(1, 2**62), min_size=1, max_size=3, unique=True))
    steps = [data.draw(valid_steps(number)) for number in numbers]
    response = client.post(
        f"/api/v1/runs/{run}/batches", content=protocol.dumps(batch_doc(run=run, steps=steps)), headers=JSON_TYPE
    )
    assert response.status_code == 200 and response.json()["stored_steps"] == len(steps), response.text
    for sent in steps:
        record = client.get(f"/api/v1/runs/{run}/steps/{sent['step']}").json()
        assert (
            record["time"] == sent["time"]
            and record["skipped"] == sent["skipped"]
            and record["scale_decision"] == sent["scale_decision"]
        )
        for key in ("step_time", "loss", "loss_scale", "new_loss_scale", "global_grad_norm", "headroom_bits"):
            assert _same(sent[key], record[key]), key
        assert len(record["lr"]) == len(sent["lr"]) and all(map(_same, sent["lr"], record["lr"]))
        assert record["scalars"].keys() == sent["scalars"].keys() and all(
            _same(v, record["scalars"][k]) for k, v in sent["scalars"].items()
        )
        for stat, text in sent["tensors"].items():
            expected = values(text, protocol.TENSOR_STATS[stat], N_TENSORS).tolist()
            received = [record["tensors"][t["name"]][stat] for t in TENSORS]
            assert all(map(_same, expected, received)), (stat, expected, received)
        assert all(set(per_tensor) == set(sent["tensors"]) for per_tensor in record["tensors"].values())


# --- the spool reader ---------------------------------------------------------------------------


spool_bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
spool_documents = st.lists(st.tuples(st.sampled_from(DOCUMENT_KINDS), spool_bodies), max_size=8)


@BOUNDED
@given(
    segments=st.lists(
        st.binary(max_size=300) | spool_documents.map(lambda docs: b"".join(_line(*d) for d in docs)),
        min_size=1,
        max_size=3,
    ),
    damage=st.binary(max_size=40),
)
def test_reader_survives_arbitrary_segment_bytes_yielding_only_well_formed_lines(
    segments: list[bytes], damage: bytes
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        files = []
        for number, content in enumerate(segments, start=1):
            files.append(content + damage)
            (Path(directory) / f"{number:06d}.jsonl").write_bytes(files[-1])
        entries = list(read_entries(directory))
        for entry in entries:
            content = files[entry.end.segment - 1]
            line_start = content.rfind(b"\n", 0, entry.end.offset - 1) + 1
            line = content[line_start : entry.end.offset]
            assert line.endswith(b"\n") and entry.kind in DOCUMENT_KINDS
            assert protocol.loads(line) == {"type": entry.kind, "body": entry.body}
        assert [(kind, body) for kind, body in iter_spool(directory)] == [(e.kind, e.body) for e in entries]


def _line(kind: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "body": body}, separators=(",", ":")).encode() + b"\n"


@BOUNDED
@given(documents=spool_documents, cut_share=st.floats(0, 1))
def test_truncated_spool_reads_back_exactly_the_complete_prefix(
    documents: list[tuple[str, dict]], cut_share: float
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        writer = SpoolWriter(directory)
        ends = [writer.append(kind, body).offset for kind, body in documents]
        writer.close()
        segment = Path(directory) / "000001.jsonl"
        content = segment.read_bytes()
        cut = round(cut_share * len(content))
        segment.write_bytes(content[:cut])
        expected = [document for document, end in zip(documents, ends, strict=True) if end <= cut]
        assert list(iter_spool(directory)) == expected


@BOUNDED
@given(documents=spool_documents, segment_bytes=st.integers(1, 400), loss=any_float)
def test_spooled_documents_round_trip_across_segments(
    documents: list[tuple[str, dict]], segment_bytes: int, loss: float
) -> None:
    documents = [*documents, ("batch", {"steps": [{"loss": protocol.encode_float(loss)}]})]
    with tempfile.TemporaryDirectory() as directory:
        writer = SpoolWriter(directory, segment_bytes=segment_bytes)
        for kind, body in documents:
            writer.append(kind, body)
        writer.close()
        read = list(iter_spool(directory))
    assert read == documents
    assert _same(protocol.encode_float(loss), read[-1][1]["steps"][0]["loss"])
