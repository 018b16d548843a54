"""Fixtures shared by the collector's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.support.collector_docs import run_doc


@pytest.fixture
def api(collector: Callable[..., str], database_url: str) -> Iterator[httpx.Client]:
    """An HTTP client of a real collector process (SQLite, then PostgreSQL) with run ``r1`` registered."""
    with httpx.Client(base_url=collector(database_url), timeout=30) as client:
        assert client.post("/api/v1/runs", json=run_doc()).status_code == 200
        yield client
