"""Rollup answers against a brute-force downsample of the raw rows, on SQLite and PostgreSQL.

Steps are sparse over 600k step numbers, clustered at the bucket edges of every level,
with NaN and ±Inf planted on the edges; batches arrive in random order, so buckets are
built by merging. Every level, several bucket widths and windows (whole run, ragged
windows, a window inside one bucket) must give exactly the raw rows' answer.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.monitor.ingest.batches import register_run, store_batch
from numwatch.monitor.ingest.schemas import BatchDocument, RunDocument
from numwatch.monitor.reads import queries, series
from numwatch.monitor.reads.queries import find_run
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store import db, rollups
from numwatch.monitor.store.auth import EVERYTHING
from numwatch.monitor.store.models import Rollup
from tests.support.collector_docs import TENSORS, array, run_doc

N = len(TENSORS)
TOP = 600_000


def _steps(rng: np.random.Generator) -> np.ndarray:
    edges = [
        m * level + d for level in rollups.LEVELS for m in range(1, 4) for d in (-2, -1, 0, 1) if m * level + d <= TOP
    ]
    return np.unique(np.concatenate([np.arange(1, 200), edges, rng.integers(1, TOP, 700)]))


def _data(rng: np.random.Generator) -> dict[str, np.ndarray]:
    steps = _steps(rng)
    norms = rng.lognormal(-2, 1.5, (len(steps), N)).astype(np.float32)
    loss = rng.normal(2, 0.5, len(steps))
    edge = np.isin(steps % 64, (0, 63))
    for column in range(N):
        planted = np.flatnonzero(edge & (rng.random(len(steps)) < 0.3))
        norms[planted, column] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), len(planted))
    loss[np.flatnonzero(edge & (rng.random(len(steps)) < 0.2))] = np.nan
    loss[np.flatnonzero(edge & (rng.random(len(steps)) < 0.1))] = np.inf
    counts = rng.integers(0, 5, (len(steps), N)) * (rng.random((len(steps), N)) < 0.05)
    # Some steps carry no loss: the loss series skips them (and the rollups must too).
    return {
        "steps": steps,
        "grad_norm": norms,
        "loss": loss,
        "nan_count": counts.astype(np.int64),
        "format": steps % 50 == 1,
        "has_loss": steps % 5 != 3,
    }


def _step_doc(i: int, data: dict[str, np.ndarray]) -> dict:
    tensors = {"grad_norm": array(data["grad_norm"][i], "<f4"), "nan_count": array(data["nan_count"][i], "<i8")}
    if data["format"][i]:
        tensors["zeros"] = array(np.arange(N) + i, "<i8")
    loss = protocol.encode_float(float(data["loss"][i])) if data["has_loss"][i] else None
    return {"step": int(data["steps"][i]), "time": 1e9 + i, "loss": loss, "lr": [1e-3], "tensors": tensors}


def reference(steps: np.ndarray, values: np.ndarray, width: int) -> list[tuple[int, float]]:
    """Per bucket of ``width`` steps: the first minimum, first maximum (±Inf count) and first NaN, in step order."""
    by_bucket: dict[int, list[tuple[int, float]]] = {}
    for s, v in zip(steps.tolist(), values.tolist(), strict=True):
        by_bucket.setdefault(s // width, []).append((s, float(v)))
    out = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        ordered = [(s, v) for s, v in members if not math.isnan(v)]
        picks = {}
        nans = [s for s, v in members if math.isnan(v)]
        if nans:
            picks[nans[0]] = math.nan
        if ordered:
            low = min(v for _, v in ordered)
            high = max(v for _, v in ordered)
            picks[next(s for s, v in ordered if v == low)] = low
            picks[next(s for s, v in ordered if v == high)] = high
        out += sorted(picks.items())
    return out


def _same(points: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in points] == [s for s, _ in expected]
    assert [repr(v) for _, v in points] == [repr(v) for _, v in expected]


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def stored(database_url: str, rng: np.random.Generator):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    data = _data(rng)
    with Session(engine) as session:
        register_run(session, RunDocument.model_validate(run_doc()), EVERYTHING)
        session.commit()
        order = rng.permutation(np.arange(0, len(data["steps"]), 64))
        for start in order:
            docs = [_step_doc(i, data) for i in range(start, min(start + 64, len(data["steps"])))]
            document = BatchDocument.model_validate({"protocol": 1, "run": "r1", "rank": 0, "steps": docs})
            store_batch(session, find_run(session, "r1", EVERYTHING), document, DetectorConfig())
            session.commit()
        yield session, find_run(session, "r1", EVERYTHING), data
    engine.dispose()


SERIES = {"grad_norm": 2, "nan_count": 1, "loss": None}


def _series(data: dict, name: str, column: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The raw (steps, values) of a series, as stored."""
    if column is None:
        return data["steps"][data["has_loss"]], data[name][data["has_loss"]]
    return data["steps"], data[name][:, column]


def _windows(steps: np.ndarray) -> list[tuple[int, int]]:
    first, last = int(steps[0]), int(steps[-1])
    return [(first, last), (63, 262145), (1025, 16383 * 2 + 5), (16384, 16384 + 1023), (100, 170), (262143, last)]


def test_every_level_and_window_equals_the_raw_rows_downsampled(stored) -> None:
    session, run, data = stored
    for name, column in SERIES.items():
        steps, values = _series(data, name, column)
        for low, high in _windows(data["steps"]):
            inside = (steps >= low) & (steps <= high)
            for level in rollups.LEVELS:
                for factor in (1, 3):
                    width = level * factor
                    got = [
                        p
                        for _, s in series.bucket_summaries(
                            step_blocks.Reader(session, run.id, 0, N), name, low, high, width, level, column
                        )
                        for p in series.summary_points(s)
                    ]
                    _same(got, reference(steps[inside], values[inside], width))


def test_summaries_count_values_and_non_finite_ones(stored) -> None:
    session, run, data = stored
    steps, norms = data["steps"], data["grad_norm"]
    level = rollups.LEVELS[1]
    for first, summary in series.bucket_summaries(
        step_blocks.Reader(session, run.id, 0, N), "grad_norm", int(steps[0]), int(steps[-1]), level, level, None
    ):
        members = (steps // level) == first // level
        assert summary.count.tolist() == [int(members.sum())] * N
        assert summary.nonfinite.tolist() == (~np.isfinite(norms[members])).sum(axis=0).tolist()


def test_the_series_api_answers_a_long_run_from_rollups_exactly(stored) -> None:
    session, run, data = stored
    steps = data["steps"]
    for name, column in SERIES.items():
        tensor = TENSORS[column]["name"] if column is not None else None
        answer = queries.series(session, run, name, tensor, 0, None, None, 1000)
        low, high = int(steps[0]), int(steps[-1])  # the window is the run's stored steps
        level = series.choose_level(low, high, 333)
        expected = reference(*_series(data, name, column), series.bucket_width(low, high, 333, level))
        assert len(answer["steps"]) <= 1000
        _same(list(zip(answer["steps"], [protocol.decode_float(v) for v in answer["values"]], strict=True)), expected)


def test_a_short_window_is_the_raw_rows(stored) -> None:
    session, run, data = stored
    steps, norms = data["steps"], data["grad_norm"]
    answer = queries.series(session, run, "grad_norm", TENSORS[0]["name"], 0, 150, 300, 1000)
    inside = (steps >= 150) & (steps <= 300)
    _same(
        list(zip(answer["steps"], [protocol.decode_float(v) for v in answer["values"]], strict=True)),
        [(int(s), float(v)) for s, v in zip(steps[inside], norms[inside, 0], strict=True)],
    )


def test_the_heatmap_covers_the_whole_run_in_bounded_columns(stored) -> None:
    session, run, data = stored
    steps, norms = data["steps"], data["grad_norm"]
    answer = queries.heatmap(session, run, "grad_norm", 0, 50)
    cells = answer.cells()
    assert json.loads(answer.cells_json()) == cells
    columns = sorted({cell["step"] for cell in cells})
    assert len(columns) <= 50 and len(cells) == len(columns) * N
    low, high = int(steps[0]), int(steps[-1])
    width = series.bucket_width(low, high, 50, series.choose_level(low, high, 50))
    for cell in cells:
        column = [t["name"] for t in TENSORS].index(cell["tensor"])
        members = (steps // width) == cell["step"] // width
        values = norms[members, column].astype(np.float64)
        expected = math.nan if np.isnan(values).any() else float(values.max())
        assert repr(protocol.decode_float(cell["value"])) == repr(expected)
    window = queries.heatmap(session, run, "grad_norm", 0, 50, start=16384, end=16384 + 30000).cells()
    assert {cell["step"] for cell in window} and all(16384 <= cell["step"] <= 16384 + 30000 for cell in window)


def test_buckets_without_coarse_rows_are_read_from_finer_levels(stored) -> None:
    """A database written before the coarser levels existed has only finer rows there: reads stay exact,
    and buckets completed afterwards are folded from what is there."""
    session, run, data = stored
    session.execute(sa.delete(Rollup).where(Rollup.level.in_(rollups.LEVELS[1::2])))
    session.commit()
    steps, norms = data["steps"], data["grad_norm"]
    more = np.arange(int(steps[-1]) + 1, int(steps[-1]) + 1 + 3 * 64)
    rng = np.random.default_rng(3)
    extra = rng.lognormal(-2, 1, (len(more), N)).astype(np.float32)
    extra[5, 1] = np.nan
    for start in range(0, len(more), 64):
        docs = [
            {
                "step": int(s),
                "time": 2e9 + int(s),
                "lr": [1e-3],
                "tensors": {"grad_norm": array(extra[i], "<f4"), "nan_count": array(np.zeros(N, np.int64), "<i8")},
            }
            for i, s in enumerate(more[start : start + 64], start)
        ]
        store_batch(
            session,
            find_run(session, "r1", EVERYTHING),
            BatchDocument.model_validate({"protocol": 1, "run": "r1", "rank": 0, "steps": docs}),
            DetectorConfig(),
        )
        session.commit()
    all_steps, all_norms = np.concatenate([steps, more]), np.concatenate([norms, extra])
    low, high = int(all_steps[0]), int(all_steps[-1])
    for column in (1, 2):
        answer = queries.series(session, run, "grad_norm", TENSORS[column]["name"], 0, None, None, 1000)
        expected = reference(
            all_steps, all_norms[:, column], series.bucket_width(low, high, 333, series.choose_level(low, high, 333))
        )
        _same(list(zip(answer["steps"], [protocol.decode_float(v) for v in answer["values"]], strict=True)), expected)
        for level in rollups.LEVELS:
            got = [
                p
                for _, s in series.bucket_summaries(
                    step_blocks.Reader(session, run.id, 0, N), "grad_norm", low, high, level, level, column
                )
                for p in series.summary_points(s)
            ]
            _same(got, reference(all_steps, all_norms[:, column], level))
