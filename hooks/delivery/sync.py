"""``numwatch sync``: upload what the spool holds, idempotently (standard library only).

Each (run, rank) directory is replayed in write order from its ``uploaded`` mark; every
acknowledged document moves the mark, so an interrupted sync resumes where it stopped and
a repeated one sends nothing twice (the collector is idempotent on (run, rank, step) anyway).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from numwatch.delivery.spool import (
    discard_uploaded_segments,
    mark_uploaded,
    read_entries,
    read_uploaded_mark,
    spool_directories,
)
from numwatch.delivery.transport import document_path, post_document, renamed_run

HTTP_TIMEOUT_S = 60.0


@dataclass
class SyncReport:
    directories: int = 0
    uploaded: int = 0
    rejected: list[str] = field(default_factory=list)  # "directory: detail" of documents the collector refused
    renamed: list[str] = field(default_factory=list)  # "asked -> stored" for runs whose name another process held
    unreachable: str | None = None  # why the sync stopped early, if it did


def pending_documents(root: str | os.PathLike[str]) -> int:
    """How many spooled documents have not reached a collector yet."""
    return sum(
        1 for directory in spool_directories(root) for _ in read_entries(directory, read_uploaded_mark(directory))
    )


def upload_spool(
    root: str | os.PathLike[str], url: str, token: str | None, progress: Callable[[int], None] = lambda n: None
) -> SyncReport:
    """Upload every pending document under ``root`` to the collector at ``url``; ``progress(1)`` per document."""
    report = SyncReport()
    url = url.rstrip("/")
    for directory in spool_directories(root):
        report.directories += 1
        for entry in read_entries(directory, read_uploaded_mark(directory)):
            outcome, detail = post_document(
                url, token, document_path(entry.kind, entry.body), entry.body, HTTP_TIMEOUT_S
            )
            if outcome == "retry":
                report.unreachable = f"{url}: {detail or 'asked to retry later'}"
                return report
            if outcome == "rejected":
                # It will never be accepted as it is: say so, and do not block what follows.
                report.rejected.append(f"{Path(directory).name}/{entry.kind}: {detail}")
            else:
                report.uploaded += 1
                stored_as = renamed_run(entry.body, detail) if entry.kind == "run" else None
                if stored_as is not None and entry.body.get("rank") == 0:
                    report.renamed.append(f"{entry.body['run']} -> {stored_as}")
            mark_uploaded(directory, entry.end)
            progress(1)
        discard_uploaded_segments(directory)
    return report
