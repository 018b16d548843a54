"""Shared fixtures: a real PostgreSQL server and real collector servers on loopback ports."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from numwatch.monitor.ops import stack
from tests.support import postgres
from tests.support.binaries import missing, require_binary
from tests.support.grafana import FakeGrafana, serving_fake_grafana
from tests.support.postgres import PostgresServer, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of the session's PostgreSQL server (skips, or fails in CI, without the binaries).

    Its data live in a fresh directory under the system temp dir, not pytest's: pytest
    makes its own base directory private (0700) at every session start, which would lock
    the server's unprivileged user out of its files.
    """
    with ExitStack() as resources:
        yield start_postgres(resources).url


@pytest.fixture
def restartable_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop and start again."""
    with ExitStack() as resources:
        yield start_postgres(resources)


def start_postgres(resources: ExitStack) -> PostgresServer:
    """A new server kept until ``resources`` close; skips (fails in CI) without PostgreSQL."""
    require_binary("initdb")
    try:
        return resources.enter_context(postgres.postgres_server())
    except PostgresUnavailable as reason:
        missing(f"PostgreSQL unavailable: {reason}")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server for this test."""
    import sqlalchemy as sa

    name = f"nw_{os.getpid()}_{next(_database_numbers)}"
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _numbers() -> Iterator[int]:
    number = 0
    while True:
        number += 1
        yield number


_database_numbers = _numbers()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'numwatch.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: ``collector(database_url=None, *extra_serve_args, **env)`` starts ``numwatch serve``
    in a subprocess on a free loopback port (migrating the database first) and returns its URL."""
    from numwatch.monitor.store import db

    with ExitStack() as resources:

        def start(database_url: str | None = None, *extra_args: str, **env: str) -> str:
            # A directory of its own: the collector takes a port of its own choosing, so a free port's
            # number may come round again within one test.
            workdir = Path(tempfile.mkdtemp(prefix="collector-", dir=tmp_path))
            database_url = database_url or f"sqlite:///{workdir / 'numwatch.db'}"
            db.upgrade(database_url)
            previous = {key: os.environ.get(key) for key in env}
            os.environ.update(env)
            try:
                return resources.enter_context(stack.running_collector(workdir, database_url, extra_args=extra_args))
            finally:
                for key, value in previous.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

        yield start


@pytest.fixture
def fake_grafana() -> Iterator[FakeGrafana]:
    """A fake Grafana (tests/support/grafana.py) for the provisioning and annotation tests."""
    with serving_fake_grafana() as state:
        yield state
