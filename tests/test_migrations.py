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


def test_steps_stored_before_clipping_was_recorded_stay_readable(database_url: str) -> None:
    from alembic import command

    engine = db.make_engine(database_url)
    try:
        with engine.begin() as connection:
            config = db.alembic_config(database_url)
            config.attributes["connection"] = connection
            command.upgrade(config, "0003")
            connection.execute(sa.text(
                "INSERT INTO runs (id, name, project, format, world_size, tensors, modules, config, status, started_at, created_at, last_seen_at) "
                "VALUES (1, 'old', 'default', 'fp16', 1, '[]', '[]', '{}', 'finished', :t, :t, :t)"), {"t": "2026-01-01 00:00:00+00:00"})
            connection.execute(sa.text(
                "INSERT INTO steps (run_id, rank, step, time, skipped, global_grad_norm, lr, scalars, stat_names, tensor_stats) "
                "VALUES (1, 0, 1, 1.0, false, 2.5, '[]', '{}', '', :blob)"), {"blob": b""})
            connection.execute(sa.text(
                "INSERT INTO rank_state (run_id, rank, last_step, last_step_time, steps_total, skipped_steps_total, nonfinite_steps_total, "
                "nonfinite_loss_total, loss_scale_backoffs_total, loss_scale_growths_total, grad_norm_bucket_counts, grad_norm_sum, layers_nonfinite, lr, events_total) "
                "VALUES (1, 0, 1, 1.0, 1, 0, 0, 0, 0, 0, '[]', 2.5, 0, '[]', '{}')"))
            command.upgrade(config, "head")
        with engine.connect() as connection:
            step = connection.execute(sa.text("SELECT global_grad_norm, clip_coef, post_clip_grad_norm, clipped FROM steps")).one()
            clipped_total = connection.execute(sa.text("SELECT clipped_steps_total FROM rank_state")).scalar_one()
        assert (step.global_grad_norm, step.clip_coef, step.post_clip_grad_norm, bool(step.clipped)) == (2.5, None, None, False)
        assert clipped_total == 0
    finally:
        engine.dispose()
