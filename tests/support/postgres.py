"""A throwaway PostgreSQL server (the machine's PostgreSQL 15 binaries) on a loopback port.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user in
a directory that user owns; as any other user it runs as that user. Used by the tests'
``postgres_url`` fixture and by ``benchmarks/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from numwatch.monitor.ops.stack import free_port

SERVICE_USER = "postgres"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries missing, no unprivileged user)."""


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and `runuser` is missing: cannot drop to the postgres user")
    return [runuser, "-u", SERVICE_USER, "--", *argv]


@dataclass
class PostgresServer:
    """A started server: its SQLAlchemy ``url``; :meth:`stop` and :meth:`start` it again (fault tests)."""

    url: str
    pg_ctl: str
    data: Path
    options: str
    log: Path

    def start(self) -> None:
        subprocess.run(
            _as_server_user(
                [
                    self.pg_ctl,
                    "-D",
                    str(self.data),
                    "-o",
                    self.options,
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    str(START_TIMEOUT_S),
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            _as_server_user([self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"]), capture_output=True
        )


@contextmanager
def postgres_server(workdir: Path | None = None, *, durable: bool = False) -> Iterator[PostgresServer]:
    """Start PostgreSQL in ``workdir`` (default: a new temporary directory); yields the server.

    As root, the server user must be able to reach ``workdir`` (the default always is).

    The database is initialised with trust auth for loopback connections only and stopped
    (``pg_ctl stop -m immediate``) when the context exits, also on error. Tests run with
    ``fsync=off``; ``durable=True`` keeps PostgreSQL's defaults (for benchmarks).
    """
    binaries = {name: shutil.which(name) for name in ("initdb", "pg_ctl")}
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        raise PostgresUnavailable(f"PostgreSQL server binaries not found on PATH: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="numwatch-pg-") as scratch:
        root = Path(workdir) if workdir else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        data, socket_dir = root / "data", root / "sock"
        socket_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            # The server user must own its directories, and reach them through the temp path.
            for path in (root, socket_dir):
                shutil.chown(path, SERVICE_USER)
            os.chmod(root, 0o755)
        subprocess.run(
            _as_server_user(
                [
                    binaries["initdb"],
                    "-D",
                    str(data),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    *([] if durable else ["--no-sync"]),
                ]
            ),
            check=True,
            capture_output=True,
        )
        port = free_port()
        log = root / "postgres.log"
        if os.geteuid() == 0:
            log.touch()
            shutil.chown(log, SERVICE_USER)
        server = PostgresServer(
            url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
            pg_ctl=binaries["pg_ctl"],
            data=data,
            options=f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1" + ("" if durable else " -c fsync=off"),
            log=log,
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def running_postgres(workdir: Path | None = None, *, durable: bool = False) -> Iterator[str]:
    """:func:`postgres_server`, yielding only its URL."""
    with postgres_server(workdir, durable=durable) as server:
        yield server.url
