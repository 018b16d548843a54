"""Deleting runs without stalling anyone's ingest: the API, ``numwatch runs delete``, ``numwatch gc`` and retention.

A run to delete is first marked ``deleting`` (invisible to reads, refusing writes), then
its rows go in many short transactions, a few hundred to a few thousand rows each, sized
to take about ``CHUNK_SECONDS``, with a pause between them longer than SQLite's longest
busy-handler sleep, so a batch of another run waiting for SQLite's single write lock gets
it within a chunk. The run row goes last, so a purge cut short (a restart) is finished by
the next sweep. On SQLite the freed pages are then handed back to the file system
(incremental vacuum, in transactions sized the same way); PostgreSQL reuses them after its
autovacuum (``VACUUM FULL`` to shrink the files, which locks the tables).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial

from sqlalchemy import CursorResult, Delete, Table, delete, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from numwatch.monitor.store.models import (
    DELETING,
    Conflict,
    Event,
    ForwardStats,
    Histogram,
    RankInbox,
    RankJudge,
    RankState,
    Rollup,
    Run,
    RunInstance,
    StepBlock,
)

log = logging.getLogger("numwatch.retention")

CHUNK_SECONDS = 0.1
PAUSE_SECONDS = 0.15
FIRST_CHUNK_ROWS = 50  # a step block holds up to 256 steps
FIRST_VACUUM_PAGES = 1_000
MAX_CHUNK_SIZE = 20_000  # rows or pages
CHILD_TABLES: tuple[Table, ...] = tuple(
    model.__table__
    for model in (
        StepBlock,
        Histogram,
        Rollup,
        ForwardStats,
        Event,
        Conflict,
        RunInstance,
        RankInbox,
        RankJudge,
        RankState,
    )
)


def mark_deleting(run: Run) -> None:
    run.status = DELETING


def runs_to_delete(session: Session, older_than: timedelta, project: str | None = None) -> list[Run]:
    """Runs not heard from for longer than ``older_than`` (of ``project`` if given)."""
    cutoff = datetime.now(timezone.utc) - older_than
    query = select(Run).where(Run.last_seen_at < cutoff, Run.status != DELETING)
    if project is not None:
        query = query.where(Run.project == project)
    return list(session.execute(query.order_by(Run.id)).scalars())


def _deleted(session: Session, statement: Delete) -> int:
    """Run ``statement``; how many rows it deleted."""
    result = session.execute(statement)
    assert isinstance(result, CursorResult)  # as every DELETE's is; Session.execute's signature does not say so
    return result.rowcount


def _delete_chunk(session: Session, limit: int, *, table: Table, run_id: int) -> int:
    keys = [column for column in table.primary_key.columns if column.name != "run_id"]
    if not keys:  # one row per run
        return _deleted(session, delete(table).where(table.c.run_id == run_id))
    chosen = select(*keys).where(table.c.run_id == run_id).limit(limit)
    key = keys[0] if len(keys) == 1 else tuple_(*keys)
    return _deleted(session, delete(table).where(table.c.run_id == run_id, key.in_(chosen)))


def _free_pages(connection: Connection) -> int:
    return int(connection.exec_driver_sql("PRAGMA freelist_count").scalar_one())


def _vacuum_chunk(session: Session, limit: int) -> int:
    """Hand back up to ``limit`` free pages; how many went."""
    connection = session.connection()
    free = _free_pages(connection)
    if free:
        # The pragma frees one page per step of its statement and a DB-API execute steps once;
        # executescript runs it to the end, in a transaction of its own.
        sqlite = connection.connection.driver_connection
        assert sqlite is not None  # the session's connection is checked out
        sqlite.executescript(f"PRAGMA incremental_vacuum({min(free, limit)});")
    return free - _free_pages(connection)


class Cancelled(Exception):
    """The collector is shutting down: a purge stops between two chunks (the next sweep resumes it)."""


class Purger:
    """Deletes rows in bounded transactions, each sized from the last one's duration."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.session_factory, self.progress, self.cancel = session_factory, progress, cancel
        # The size of the next transaction: rows to delete, pages to hand back.
        self.sizes = {"rows": FIRST_CHUNK_ROWS, "pages": FIRST_VACUUM_PAGES}

    def _pause(self) -> None:
        if self.cancel is not None and self.cancel.wait(PAUSE_SECONDS):
            raise Cancelled
        if self.cancel is None:
            time.sleep(PAUSE_SECONDS)

    def _chunks(self, work: Callable[[Session, int], int], unit: str = "rows") -> int:
        """Run ``work(session, limit)`` (what it did, at most ``limit`` ``unit``) until it does less than asked."""
        total = 0
        while True:
            started, limit = time.perf_counter(), self.sizes[unit]
            with self.session_factory() as session:
                done = work(session, limit)
                session.commit()
            elapsed = time.perf_counter() - started
            total += done
            if self.progress and done and unit == "rows":
                self.progress(done)
            if elapsed < CHUNK_SECONDS / 2:
                self.sizes[unit] = min(MAX_CHUNK_SIZE, limit * 2)
            elif elapsed > CHUNK_SECONDS:
                self.sizes[unit] = max(50, limit // 2)
            if done < limit:
                return total
            self._pause()

    def purge(self, run_id: int) -> int:
        """Delete every row of run ``run_id``, then the run; the number of rows deleted."""
        total = sum(self._chunks(partial(_delete_chunk, table=table, run_id=run_id)) for table in CHILD_TABLES)
        with self.session_factory() as session:
            total += _deleted(session, delete(Run).where(Run.id == run_id))
            session.commit()
        return total

    def orphans(self) -> int:
        """Delete rows whose run no longer exists (left by a delete made by hand with foreign keys off)."""
        total = 0
        with self.session_factory() as session:
            lost = {
                run_id
                for table in CHILD_TABLES
                for run_id in session.execute(
                    select(table.c.run_id).where(table.c.run_id.not_in(select(Run.id))).distinct()
                ).scalars()
            }
        for run_id in sorted(lost):
            total += sum(self._chunks(partial(_delete_chunk, table=table, run_id=run_id)) for table in CHILD_TABLES)
        return total

    def vacuum(self) -> int:
        """Hand SQLite's free pages back to the file system, a bounded transaction at a time; pages freed."""
        with self.session_factory() as session:
            if session.get_bind().dialect.name != "sqlite":
                return 0
        freed = self._chunks(_vacuum_chunk, "pages")
        with self.session_factory() as session:
            # The WAL now holds the moved pages: a checkpoint that waits for no one lets the next
            # writer restart it, and journal_size_limit truncates the file.
            session.connection().exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        return freed

    def sweep(self) -> int:
        """Finish every run marked for deletion; the number of runs deleted."""
        with self.session_factory() as session:
            pending = list(
                session.execute(select(Run.id, Run.name).where(Run.status == DELETING).order_by(Run.id)).all()
            )
        for run_id, name in pending:
            rows = self.purge(run_id)
            log.info("deleted run %r (%d rows)", name, rows)
        if pending:
            self.vacuum()
        return len(pending)


class Reaper:
    """The collector's background deleter: runs marked for deletion, and runs past the retention period."""

    def __init__(
        self, session_factory: sessionmaker[Session], retention: timedelta | None, check_seconds: float
    ) -> None:
        self._wake, self._stop = threading.Event(), threading.Event()
        self.purger = Purger(session_factory, cancel=self._stop)
        self.session_factory, self.retention, self.check_seconds = session_factory, retention, check_seconds
        self._thread = threading.Thread(target=self._loop, name="numwatch-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _expire(self) -> None:
        if self.retention is None:
            return
        with self.session_factory() as session:
            expired = runs_to_delete(session, self.retention)
            for run in expired:
                mark_deleting(run)
                log.info("run %r not seen for over %s: deleting it (retention)", run.name, self.retention)
            session.commit()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._expire()
                self.purger.sweep()
            except Cancelled:
                return
            except Exception:  # a database outage must not end the thread; the next round retries
                log.exception("deleting runs failed; retrying in %.0f s", self.check_seconds)
            self._wake.wait(self.check_seconds)
            self._wake.clear()
