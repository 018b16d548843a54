"""Alembic migrations: upgrade from empty matches the models exactly; an outdated schema is refused."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from numwatch.monitor import db
from numwatch.monitor.models import Base


def test_upgrade_from_empty_matches_models(database_url: str) -> None:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        db.check_schema(engine)  # current: no error
    finally:
        engine.dispose()


def test_serve_refuses_an_outdated_schema_and_says_what_to_run(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # a database from some other tool/version: tables but no revision
        connection.execute(sa.text("CREATE TABLE runs (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    result = subprocess.run([sys.executable, "-m", "numwatch.monitor.cli", "serve", "--port", "1", "--database-url", url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "numwatch db upgrade --database-url" in result.stderr
