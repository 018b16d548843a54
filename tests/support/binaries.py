"""What tests need from the machine (server binaries, DeepSpeed, torch.distributed): skipped locally, failed in CI."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRE_ENV = "NUMWATCH_REQUIRE_BINARIES"


DEFAULT_HINT = (
    "Debian: apt-get install prometheus prometheus-alertmanager; PostgreSQL 15 server binaries for initdb/pg_ctl"
)


def require_binary(name: str, hint: str = DEFAULT_HINT) -> str:
    """Path of ``name`` on PATH; skips the test when it is missing, or fails when
    NUMWATCH_REQUIRE_BINARIES=1 (CI installs every binary and must not skip)."""
    path = shutil.which(name)
    if path:
        return path
    missing(f"{name} is not installed ({hint})")


def missing(reason: str) -> NoReturn:
    """Something the test needs is missing: skip it, or fail when NUMWATCH_REQUIRE_BINARIES=1
    (CI installs everything the tests need and must not skip)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it")
    pytest.skip(reason)
