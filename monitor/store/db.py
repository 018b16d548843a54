"""Database engine, sessions and schema version (Alembic) for the collector."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
INCREMENTAL_VACUUM = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
PAGE_SIZE = 4096


class SchemaOutdated(RuntimeError):
    """The database's schema is older (or newer) than this code."""


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``; SQLite files get WAL mode and a busy timeout."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = connection.cursor()
            # Step blocks (~130 KB for 64 steps of 300 tensors) and histograms (~65 KB) fill chains of
            # overflow pages whose last page is half empty on average: 2 KB of a 4 KB page, 16 KB of a
            # 32 KB one (a tenth of a block).
            # Both this and auto_vacuum take effect only while the file is new, page size first
            # (`numwatch db upgrade` VACUUMs older files into them).
            cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
            # Freed pages are handed back by PRAGMA incremental_vacuum after a deletion.
            cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
            # WAL: readers (/metrics, queries) never block the writer. NORMAL survives a process crash;
            # a power loss may undo the last commits (docs/guarantees.md, Durability: use PostgreSQL for that).
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # A checkpoint after a large deletion truncates the WAL back to this size.
            cursor.execute("PRAGMA journal_size_limit=67108864")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None  # the migrations ship with the package
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(database_url: str) -> None:
    """Apply every migration to ``database_url`` (creates the database file for SQLite).

    On SQLite, migrations that rebuild a table run with foreign keys off (dropping the old
    ``runs`` table would otherwise cascade into every step); the keys are checked after.
    A file made before incremental vacuum is VACUUMed into it (and into larger pages) once.
    """
    engine = make_engine(database_url)
    sqlite = engine.url.get_backend_name() == "sqlite"
    try:
        with engine.connect() as connection:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()  # ends SQLAlchemy's autobegun transaction (the driver opened none)
            with connection.begin():
                config = alembic_config(database_url)
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"foreign keys broken after the migration: {broken[:5]}")
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                if connection.exec_driver_sql("PRAGMA auto_vacuum").scalar() != INCREMENTAL_VACUUM:
                    # The page size of a WAL database is fixed: rebuilt in rollback-journal mode, then back to WAL.
                    connection.exec_driver_sql("PRAGMA journal_mode=DELETE")
                    connection.exec_driver_sql(f"PRAGMA page_size={PAGE_SIZE}")
                    connection.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
                    connection.exec_driver_sql("VACUUM")
                    connection.exec_driver_sql("PRAGMA journal_mode=WAL")
                connection.commit()
    finally:
        engine.dispose()


def check_schema(engine: Engine) -> None:
    """Raise :class:`SchemaOutdated`, saying which command to run, unless the schema is current."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutdated(
            f"database schema is at revision {current or 'none (empty database)'}, this numwatch needs {head}: "
            f"run `numwatch db upgrade --database-url {engine.url.render_as_string(hide_password=True)}`"
        )
