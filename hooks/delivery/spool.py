"""The on-disk spool: protocol documents kept as JSON lines until a collector has them.

One directory per (run, rank) under a spool root. Inside it, append-only segment files
``000001.jsonl``, ``000002.jsonl``, ... hold one ``{"type": "run"|"batch", "body": {...}}``
per line, the exact documents of :mod:`numwatch.protocol`. A file ``uploaded`` records how far
the collector has acknowledged (segment name and byte offset), replaced atomically.

Crash safety: a line only counts once its newline is written, so a torn last line (the
process died mid-write, or the disk filled up) is skipped by readers and never affects the
lines before it; a writer that finds or leaves a torn tail starts its next line on a fresh
line, so the fragment stays a line of its own that readers skip.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numwatch import protocol, settings

log = logging.getLogger(__name__)

DOCUMENT_KINDS = ("run", "batch")
# A writer starts a new segment past this size, so fully uploaded segments can be deleted.
SEGMENT_BYTES = 64 * 1024 * 1024
_SEGMENT_NAME = re.compile(r"^(\d{6})\.jsonl$")
_UPLOADED_FILE = "uploaded"


def default_spool_root() -> Path:
    """``$NUMWATCH_SPOOL_DIR``, else ``$XDG_DATA_HOME/numwatch/spool``, else ``~/.local/share/numwatch/spool``."""
    configured = settings.read(settings.SPOOL_DIR)
    if configured is not None:
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "numwatch" / "spool"


def spool_directory(root: str | os.PathLike[str], run: str, rank: int, instance: str) -> Path:
    """The directory of one (run, rank) of one watching process (``instance``) under a spool
    root: two processes using one run name never write into the same files. Run names are
    made path-safe."""
    safe_run = re.sub(r"[^A-Za-z0-9._-]", "_", run) or "_"
    return Path(root) / f"{safe_run}.{instance}" / f"rank{rank}"


def spool_directories(root: str | os.PathLike[str]) -> list[Path]:
    """Every (run, rank) directory under a spool root, sorted (what ``numwatch sync`` walks)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/rank*") if p.is_dir() and _segments(p))


@dataclass(frozen=True, order=True)
class SpoolPosition:
    """Where a spooled line ends: segment number and byte offset just past its newline."""

    segment: int
    offset: int


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled document and the position just past it (to mark it uploaded)."""

    kind: str
    body: dict[str, Any]
    end: SpoolPosition


def _segments(directory: Path) -> list[int]:
    numbers = []
    for path in directory.iterdir():
        match = _SEGMENT_NAME.match(path.name)
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def _segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:06d}.jsonl"


def _parse_line(line: bytes) -> tuple[str, dict[str, Any]] | None:
    try:
        document = protocol.loads(line)
        kind, body = document["type"], document["body"]
    except (ValueError, KeyError, TypeError):
        return None
    if kind not in DOCUMENT_KINDS or not isinstance(body, dict):
        return None
    return kind, body


def read_entries(directory: str | os.PathLike[str], after: SpoolPosition | None = None) -> Iterator[SpoolEntry]:
    """Complete, well-formed documents of one (run, rank) directory in write order,
    starting after ``after``. Torn or garbled lines are skipped (and logged)."""
    directory = Path(directory)
    for number in _segments(directory):
        if after is not None and number < after.segment:
            continue
        start = after.offset if after is not None and number == after.segment else 0
        with open(_segment_path(directory, number), "rb") as handle:
            handle.seek(start)
            offset = start
            for line in handle:
                offset += len(line)
                if not line.endswith(b"\n"):
                    break  # torn tail: the writer died mid-line; nothing follows it
                parsed = _parse_line(line)
                if parsed is None:
                    log.warning("numwatch spool %s: skipping a torn or garbled line in segment %06d", directory, number)
                    continue
                yield SpoolEntry(parsed[0], parsed[1], SpoolPosition(number, offset))


def iter_spool(
    directory: str | os.PathLike[str], *, pending_only: bool = False
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(kind, body)`` of every document spooled for one (run, rank), in order;
    with ``pending_only``, only those not yet marked uploaded."""
    after = read_uploaded_mark(directory) if pending_only else None
    for entry in read_entries(directory, after):
        yield entry.kind, entry.body


def read_uploaded_mark(directory: str | os.PathLike[str]) -> SpoolPosition | None:
    """How far a collector has acknowledged this directory's documents (None: nothing yet)."""
    try:
        segment, offset = (Path(directory) / _UPLOADED_FILE).read_text().split()
        return SpoolPosition(int(segment), int(offset))
    except (FileNotFoundError, ValueError):
        return None


def mark_uploaded(directory: str | os.PathLike[str], position: SpoolPosition) -> None:
    """Record (durably, atomically) that everything up to ``position`` reached a collector."""
    directory = Path(directory)
    temporary = directory / f".{_UPLOADED_FILE}.tmp"
    with open(temporary, "w") as handle:
        handle.write(f"{position.segment} {position.offset}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / _UPLOADED_FILE)


def discard_uploaded_segments(directory: str | os.PathLike[str]) -> int:
    """Delete segments wholly before the uploaded mark (the active one is kept); returns how many."""
    directory = Path(directory)
    mark = read_uploaded_mark(directory)
    if mark is None:
        return 0
    removed = 0
    for number in _segments(directory):
        if number < mark.segment:
            _segment_path(directory, number).unlink(missing_ok=True)
            removed += 1
    return removed


class SpoolWriter:
    """Appends protocol documents to one (run, rank) directory; safe to share between threads."""

    def __init__(self, directory: str | os.PathLike[str], segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        existing = _segments(self.directory)
        self._segment = existing[-1] if existing else 1
        self._handle = self._open_segment(self._segment)

    def _open_segment(self, number: int) -> Any:
        # Unbuffered: a failed write (disk full) leaves nothing behind in a buffer to resurface later.
        handle = open(_segment_path(self.directory, number), "ab", buffering=0)
        self._torn = False
        if handle.tell() > 0:
            with open(_segment_path(self.directory, number), "rb") as reader:
                reader.seek(-1, os.SEEK_END)
                self._torn = reader.read(1) != b"\n"
        return handle

    def append(self, kind: str, body: Mapping[str, Any]) -> SpoolPosition:
        """Write one document as a line; returns where it ends.

        Raises ``OSError`` when the disk refuses it (full, read-only); the next append then
        starts on a fresh line, so a partly written line never swallows a later document.
        """
        if kind not in DOCUMENT_KINDS:
            raise ValueError(f"spool documents are {DOCUMENT_KINDS}, not {kind!r}")
        line = json.dumps({"type": kind, "body": body}, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        with self._lock:
            if self._handle.tell() > 0 and self._handle.tell() + len(line) > self._segment_bytes:
                self._rotate()
            data = memoryview(b"\n" + line if self._torn else line)
            self._torn = True  # until the whole line is down
            while data:
                data = data[self._handle.write(data) :]
            self._torn = False
            return SpoolPosition(self._segment, self._handle.tell())

    def _rotate(self) -> None:
        self._sync_locked()
        self._handle.close()
        self._segment += 1
        self._handle = self._open_segment(self._segment)

    def _sync_locked(self) -> None:
        os.fsync(self._handle.fileno())

    def flush(self) -> None:
        """Make everything appended so far durable (fsync)."""
        with self._lock:
            if not self._handle.closed:
                self._sync_locked()

    def close(self) -> None:
        """fsync and close; further appends raise."""
        with self._lock:
            if not self._handle.closed:
                self._sync_locked()
                self._handle.close()
