"""The on-disk spool: round trip, torn-line recovery, upload marks, segments."""

from __future__ import annotations

import math

from numwatch import protocol
from numwatch.delivery.spool import (
    SpoolWriter,
    default_spool_root,
    discard_uploaded_segments,
    iter_spool,
    mark_uploaded,
    read_entries,
    read_uploaded_mark,
    spool_directories,
    spool_directory,
)


def _batch(step: int) -> dict:
    return {
        "protocol": 1,
        "run": "r",
        "rank": 0,
        "batch_id": f"b{step}",
        "steps": [{"step": step, "loss": protocol.encode_float(math.nan)}],
        "histograms": [],
        "events": [],
        "status": "running",
    }


def test_round_trip_keeps_order_and_documents(tmp_path):
    directory = spool_directory(tmp_path, "my run/1", 3, "0a1b")
    writer = SpoolWriter(directory)
    run_doc = {"protocol": 1, "run": "my run/1", "rank": 3, "tensors": []}
    writer.append("run", run_doc)
    for step in range(1, 6):
        writer.append("batch", _batch(step))
    writer.close()
    documents = list(iter_spool(directory))
    assert documents == [("run", run_doc)] + [("batch", _batch(s)) for s in range(1, 6)]
    assert math.isnan(protocol.decode_float(documents[1][1]["steps"][0]["loss"]))
    assert spool_directories(tmp_path) == [directory]


def test_torn_last_line_is_skipped_and_earlier_lines_survive(tmp_path):
    writer = SpoolWriter(tmp_path)
    writer.append("batch", _batch(1))
    end = writer.append("batch", _batch(2))
    writer.close()
    segment = tmp_path / f"{end.segment:06d}.jsonl"
    with open(segment, "ab") as handle:
        handle.write(b'{"type":"batch","body":{"protocol":1,"ru')  # the process died here
    assert [body["batch_id"] for _, body in iter_spool(tmp_path)] == ["b1", "b2"]


def test_writer_after_torn_line_starts_on_a_fresh_line(tmp_path):
    writer = SpoolWriter(tmp_path)
    writer.append("batch", _batch(1))
    writer.close()
    with open(tmp_path / "000001.jsonl", "ab") as handle:
        handle.write(b'{"type":"batch","bo')
    reopened = SpoolWriter(tmp_path)
    reopened.append("batch", _batch(2))
    reopened.close()
    assert [body["batch_id"] for _, body in iter_spool(tmp_path)] == ["b1", "b2"]
    lines = (tmp_path / "000001.jsonl").read_bytes().split(b"\n")
    assert lines[1] == b'{"type":"batch","bo'  # the fragment is its own (skipped) line


def test_upload_mark_resumes_after_acknowledged_documents(tmp_path):
    writer = SpoolWriter(tmp_path)
    for step in range(1, 5):
        writer.append("batch", _batch(step))
    entries = list(read_entries(tmp_path))
    assert read_uploaded_mark(tmp_path) is None
    mark_uploaded(tmp_path, entries[1].end)
    assert read_uploaded_mark(tmp_path) == entries[1].end
    assert [b["batch_id"] for _, b in iter_spool(tmp_path, pending_only=True)] == ["b3", "b4"]
    writer.append("batch", _batch(5))
    writer.close()
    assert [b["batch_id"] for _, b in iter_spool(tmp_path, pending_only=True)] == ["b3", "b4", "b5"]


def test_segments_rotate_and_uploaded_ones_are_discarded(tmp_path):
    writer = SpoolWriter(tmp_path, segment_bytes=400)
    for step in range(1, 9):
        writer.append("batch", _batch(step))
    writer.close()
    segments = sorted(tmp_path.glob("*.jsonl"))
    assert len(segments) > 2
    entries = list(read_entries(tmp_path))
    assert [e.body["batch_id"] for e in entries] == [f"b{s}" for s in range(1, 9)]
    mark_uploaded(tmp_path, entries[-1].end)
    assert discard_uploaded_segments(tmp_path) == len(segments) - 1
    assert list(iter_spool(tmp_path, pending_only=True)) == []


def test_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMWATCH_SPOOL_DIR", str(tmp_path / "a"))
    assert default_spool_root() == tmp_path / "a"
    monkeypatch.delenv("NUMWATCH_SPOOL_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_spool_root() == tmp_path / "xdg" / "numwatch" / "spool"
