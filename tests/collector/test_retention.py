"""Deleting runs through the API, `numwatch runs delete`, `numwatch gc` and the retention setting,
on SQLite and PostgreSQL.

After a deletion no row of the run is left in any table, other runs keep every row, the
name can be registered again and the new run (a new id) sees none of the old rows.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from numwatch import protocol
from numwatch.monitor.store import db, retention
from tests.support.collector_docs import TENSORS, array, batch_doc, run_doc, step_doc

JSON = {"Content-Type": "application/json"}
CHILD_TABLES = (
    "step_blocks",
    "histograms",
    "rollups",
    "forward_stats",
    "events",
    "conflicts",
    "run_instances",
    "rank_state",
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "numwatch.monitor.ops.cli", *args], capture_output=True, text=True, timeout=120
    )


def _histogram(step: int) -> dict:
    n = len(TENSORS)
    return {
        "step": step,
        "kind": "grad",
        "exponent": array(np.ones(n * protocol.EXPONENT_BINS), "<i8"),
        "linear_min": array(np.zeros(n), "<f4"),
        "linear_max": array(np.ones(n), "<f4"),
        "linear": array(np.ones(n * protocol.LINEAR_BINS), "<i8"),
    }


def _fill(client: httpx.Client, run: str, steps: int = 300, headers: dict | None = None) -> None:
    headers = headers or {}
    assert client.post("/api/v1/runs", json=run_doc(run=run, project="p"), headers=headers).status_code == 200
    for first in range(1, steps + 1, 100):
        doc = batch_doc(
            run=run,
            steps=[
                step_doc(
                    s,
                    norms=[0.5, float("nan") if s % 7 == 0 else 1.0, 2.0],
                    **({"attention_logit_max": {"h.0.attn": 1.5}} if s % 50 == 1 else {}),
                )
                for s in range(first, first + 100)
            ],
            histograms=[_histogram(first)],
        )
        response = client.post(f"/api/v1/runs/{run}/batches", content=protocol.dumps(doc), headers={**JSON, **headers})
        assert response.status_code == 200, response.text
        assert response.json()["stored_steps"] == 100


def _rows(database_url: str, run_id: int) -> dict[str, int]:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        counts = {
            table: connection.execute(
                sa.text(f"SELECT count(*) FROM {table} WHERE run_id = :id"), {"id": run_id}
            ).scalar()
            for table in CHILD_TABLES
        }
        counts["runs"] = connection.execute(
            sa.text("SELECT count(*) FROM runs WHERE id = :id"), {"id": run_id}
        ).scalar()
        counts["steps"] = connection.execute(
            sa.text("SELECT coalesce(sum(count), 0) FROM step_blocks WHERE run_id = :id"), {"id": run_id}
        ).scalar()
    engine.dispose()
    return counts


def _run_id(database_url: str, name: str) -> int:
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        run_id = connection.execute(sa.text("SELECT id FROM runs WHERE name = :name"), {"name": name}).scalar()
    engine.dispose()
    return run_id


def _wait_gone(database_url: str, run_id: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(_rows(database_url, run_id).values()):
        assert time.monotonic() < deadline, f"rows left: {_rows(database_url, run_id)}"
        time.sleep(0.2)


def test_deleting_through_the_api_removes_every_row_and_the_name_starts_afresh(collector, database_url: str) -> None:
    url = collector(database_url)
    with httpx.Client(base_url=url, timeout=30) as client:
        _fill(client, "doomed")
        _fill(client, "kept")
        doomed, kept = _run_id(database_url, "doomed"), _run_id(database_url, "kept")
        assert all(
            _rows(database_url, doomed)[table]
            for table in ("step_blocks", "histograms", "rollups", "forward_stats", "rank_state")
        )
        kept_before = _rows(database_url, kept)

        response = client.delete("/api/v1/runs/doomed")
        assert response.status_code == 202 and response.json() == {"run": "doomed", "status": "deleting"}
        # Gone for readers and writers at once, while the rows are still being deleted.
        assert client.get("/api/v1/runs/doomed").status_code == 404
        assert [run["run"] for run in client.get("/api/v1/runs").json()] == ["kept"]
        assert client.delete("/api/v1/runs/doomed").status_code in (404, 202)
        _wait_gone(database_url, doomed)
        assert _rows(database_url, kept) == kept_before

        assert client.post("/api/v1/runs", json=run_doc(run="doomed", project="p")).status_code == 200
        assert _run_id(database_url, "doomed") > kept
        assert client.get("/api/v1/runs/doomed/series", params={"metric": "loss"}).json() == {"steps": [], "values": []}
        body = protocol.dumps(batch_doc(run="doomed", steps=[step_doc(1, loss=9.0)]))
        assert client.post("/api/v1/runs/doomed/batches", content=body, headers=JSON).json()["stored_steps"] == 1
        assert client.get("/api/v1/runs/doomed/series", params={"metric": "loss"}).json() == {
            "steps": [1],
            "values": [9.0],
        }
        assert "doomed" in client.get("/metrics").text
        assert client.get("/api/v1/runs/kept/series", params={"metric": "loss", "max_points": 1000}).json()[
            "steps"
        ] == list(range(1, 301))


def test_a_token_deletes_only_runs_of_its_project(collector, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'auth.db'}"
    db.upgrade(database_url)
    tokens = {
        project: run_cli("token", "create", "--project", project, "--database-url", database_url)
        .stdout.strip()
        .splitlines()[-1]
        for project in ("p", "q")
    }
    url = collector(database_url, "--auth", "token")
    with httpx.Client(base_url=url, timeout=30) as client:
        owner = {"Authorization": f"Bearer {tokens['p']}"}
        _fill(client, "mine", steps=100, headers=owner)
        assert client.delete("/api/v1/runs/mine").status_code == 401
        assert client.delete("/api/v1/runs/mine", headers={"Authorization": f"Bearer {tokens['q']}"}).status_code == 404
        assert client.get("/api/v1/runs/mine", headers=owner).status_code == 200
        assert client.delete("/api/v1/runs/mine", headers=owner).status_code == 202
        _wait_gone(database_url, 1)


def test_cli_delete_and_gc_remove_every_row_and_give_space_back(collector, database_url: str) -> None:
    url = collector(database_url)
    with httpx.Client(base_url=url, timeout=30) as client:
        for name in ("a", "old", "recent"):
            _fill(client, name)
    ids = {name: _run_id(database_url, name) for name in ("a", "old", "recent")}
    result = run_cli("runs", "delete", "a", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert not any(_rows(database_url, ids["a"]).values())
    assert run_cli("runs", "delete", "a", "--database-url", database_url).returncode == 1

    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE runs SET last_seen_at = :t WHERE name = 'old'"),
            {"t": "2020-01-01 00:00:00" if engine.dialect.name == "sqlite" else "2020-01-01T00:00:00+00:00"},
        )
    engine.dispose()
    assert run_cli("gc", "--older-than", "x", "--database-url", database_url).returncode == 2
    result = run_cli("gc", "--older-than", "30d", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert "deleted 1 runs" in result.stdout
    assert not any(_rows(database_url, ids["old"]).values())
    assert _rows(database_url, ids["recent"])["steps"] == 300
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            assert (
                connection.execute("PRAGMA freelist_count").fetchone()[0] == 0
            )  # the freed pages went back to the file system


def test_a_run_deleted_by_hand_leaves_nothing_a_new_run_inherits(collector, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'hand.db'}"
    url = collector(database_url)
    with httpx.Client(base_url=url, timeout=30) as client:
        _fill(client, "first", steps=100)
        old = _run_id(database_url, "first")
        with sqlite3.connect(
            tmp_path / "hand.db"
        ) as connection:  # the sqlite3 shell's way: foreign keys off, nothing cascades
            connection.execute("DELETE FROM runs WHERE id = ?", (old,))
        _fill(client, "second", steps=100)  # every step new: no old step of the reused id conflicts
        assert _run_id(database_url, "second") != old
        assert client.get("/api/v1/runs/second/series", params={"metric": "loss"}).json()["steps"] == list(
            range(1, 101)
        )
    assert _rows(database_url, old)["steps"] == 100
    result = run_cli("gc", "--older-than", "3650d", "--database-url", database_url)
    assert result.returncode == 0 and "rows of runs deleted by hand" in result.stdout, result.stdout + result.stderr
    assert not any(_rows(database_url, old).values())


def test_the_retention_setting_deletes_runs_not_seen_for_longer(collector, tmp_path) -> None:
    database_url = f"sqlite:///{tmp_path / 'retention.db'}"
    db.upgrade(database_url)
    url = collector(database_url, NUMWATCH_RETENTION_DAYS="1", NUMWATCH_RETENTION_CHECK_SECONDS="0.5")
    with httpx.Client(base_url=url, timeout=30) as client:
        _fill(client, "stale", steps=100)
        _fill(client, "live", steps=100)
        stale = _run_id(database_url, "stale")
        with sqlite3.connect(tmp_path / "retention.db") as connection:
            connection.execute("UPDATE runs SET last_seen_at = '2020-01-01 00:00:00.000000' WHERE id = ?", (stale,))
        _wait_gone(database_url, stale)
        assert [run["run"] for run in client.get("/api/v1/runs").json()] == ["live"]


def test_the_vacuum_hands_back_every_free_page_in_bounded_transactions(tmp_path, monkeypatch) -> None:
    database_url = f"sqlite:///{tmp_path / 'free.db'}"
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    with engine.begin() as connection:  # 20 MB of pages, then freed
        connection.exec_driver_sql("CREATE TABLE filler (data BLOB)")
        connection.exec_driver_sql(
            "INSERT INTO filler SELECT randomblob(4000) FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
            "FROM n WHERE i < 5000) SELECT i FROM n)"
        )
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE filler")
    with engine.connect() as connection:
        free = connection.exec_driver_sql("PRAGMA freelist_count").scalar()
    assert free >= 5000
    size = (tmp_path / "free.db").stat().st_size
    steps = []

    def chunk(session, limit: int) -> int:
        steps.append((limit, done := vacuum_chunk(session, limit)))
        return done

    vacuum_chunk = retention._vacuum_chunk
    monkeypatch.setattr(retention, "_vacuum_chunk", chunk)
    purger = retention.Purger(sessionmaker(engine))
    monkeypatch.setattr(purger, "_pause", lambda: None)
    assert purger.vacuum() == free
    # Each transaction hands back all the pages it may (the last: what is left), at most MAX_CHUNK_SIZE.
    assert steps[0] == (retention.FIRST_VACUUM_PAGES, retention.FIRST_VACUUM_PAGES)
    assert all(done == limit <= retention.MAX_CHUNK_SIZE for limit, done in steps[:-1]) and steps[-1][1] < steps[-1][0]
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA freelist_count").scalar() == 0
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    assert (tmp_path / "free.db").stat().st_size <= size - free * 4096 + (1 << 20)
