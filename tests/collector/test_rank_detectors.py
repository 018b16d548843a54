"""The detectors across ranks: judging one step, and judging as the ranks' batches arrive (SQLite, PostgreSQL)."""

from __future__ import annotations

import math

import pytest
from sqlalchemy import select

from numwatch import protocol
from numwatch.monitor.detectors.ranks import RankHealth, empty_state, judge_step
from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.monitor.ingest.batches import register_run, store_batch
from numwatch.monitor.ingest.schemas import BatchDocument, RunDocument
from numwatch.monitor.reads.queries import find_run
from numwatch.monitor.store import db
from numwatch.monitor.store.auth import EVERYTHING
from numwatch.monitor.store.models import Event, RankInbox, RankJudge
from tests.support.collector_docs import batch_doc, run_doc, step_doc

CONFIG = DetectorConfig()
WORLD = 4


def healthy(rank: int, **fields) -> RankHealth:
    values = {"loss": 1.0 + 0.01 * rank, "local_grad_norm": 2.0 + 0.02 * rank, "local_nonfinite": 0}
    values |= {"compute_time": 0.1, "checksum": None}
    return RankHealth(rank=rank, time=1.0, **(values | fields))


def judge(steps: list[dict[int, RankHealth]], config: DetectorConfig = CONFIG) -> list[tuple[int, int, dict]]:
    """(step, stored rank, event) of judging ``steps`` (numbered from 1) in order."""
    state, out = empty_state(), []
    for number, ranks in enumerate(steps, start=1):
        out += [(number, rank, event) for rank, event in judge_step(number, ranks, WORLD, state, config)]
    return out


def step(**changed: dict) -> dict[int, RankHealth]:
    return {rank: healthy(rank, **changed.get(f"r{rank}", {})) for rank in range(WORLD)}


def test_one_rank_non_finite_names_it_and_the_finite_ones_once_per_episode() -> None:
    inf = {"r2": {"local_grad_norm": math.inf, "local_nonfinite": 3, "nonfinite_tensors": ["fc.weight"]}}
    everyone_nan = {f"r{r}": {"local_grad_norm": math.nan, "local_nonfinite": 9} for r in range(WORLD)}
    events = judge([step(), step(**inf), step(**everyone_nan), step(**everyone_nan), step(), step(**inf)])
    assert [(n, rank, e["kind"]) for n, rank, e in events] == [(2, 2, "rank_nonfinite"), (6, 2, "rank_nonfinite")]
    details = events[0][2]["details"]
    assert details["ranks"] == [2] and details["finite_ranks"] == [0, 1, 3] and not details["all_ranks"]
    assert (
        details["message"] == "rank 2 of 4 first produced a non-finite local gradient at step 2; ranks 0, 1, 3 finite"
    )
    assert details["tensors"] == {"2": ["fc.weight"]} and "hardware" in details["diagnosis"]


def test_every_rank_at_once_says_all_ranks() -> None:
    nan_loss = {f"r{r}": {"loss": math.nan} for r in range(WORLD)}
    ((number, rank, event),) = judge([step(), step(**nan_loss)])
    assert (number, rank) == (2, 0) and event["details"]["all_ranks"]
    assert event["details"]["message"] == "all 4 ranks produced a non-finite loss at once at step 2"
    assert "numerics" in event["details"]["diagnosis"]


def test_a_slow_rank_is_a_straggler_after_k_steps_once() -> None:
    config = DetectorConfig(straggler_steps=3)
    slow = step(r1={"compute_time": 0.5})
    events = judge([step(), slow, slow, slow, slow, step(), slow, slow], config)
    assert [(n, rank, e["kind"]) for n, rank, e in events] == [(4, 1, "straggler")]
    assert events[0][2]["details"]["ratio"] == pytest.approx(5.0)
    # Timer noise: within the factor, or above it by less than straggler_min_excess, is not slow.
    jitter = step(r3={"compute_time": 0.1 + 0.004})
    assert judge([jitter] * 10, config) == []


def test_outliers_need_many_robust_sigmas_and_a_real_distance() -> None:
    far = step(r3={"local_grad_norm": 200.0})
    events = judge([step(), far, far, step(), far])
    assert [(n, rank, e["kind"]) for n, rank, e in events] == [(2, 3, "rank_outlier"), (5, 3, "rank_outlier")]
    assert list(events[0][2]["details"]["metrics"]) == ["local_grad_norm"]
    # Tiny spreads make the MAD tiny: a 30% difference is still no outlier.
    assert judge([step(r0={"loss": 1.3})]) == []


def test_replica_divergence_names_the_odd_rank_on_checksum_steps() -> None:
    same = {f"r{r}": {"checksum": 12345} for r in range(WORLD)}
    flipped = {**same, "r3": {"checksum": 12345 + 2**20}}
    events = judge([step(**same), step(), step(**flipped), step(), step(**flipped), step(**same)])
    assert [(n, rank, e["kind"]) for n, rank, e in events] == [(3, 3, "replica_divergence")]
    assert events[0][2]["details"]["ranks"] == [3] and events[0][2]["details"]["agreeing_ranks"] == [0, 1, 2]


def test_missing_ranks_are_recorded_per_step_range() -> None:
    state = empty_state()
    for number in range(1, 6):
        ranks = {rank: healthy(rank) for rank in range(WORLD) if not (rank == 3 and 2 <= number <= 4)}
        judge_step(number, ranks, WORLD, state, CONFIG)
    assert state["gaps"] == [[2, 4, [3]]]


# -- as batches arrive --------------------------------------------------------------------


def _post(session, rank: int, numbers: list[int], local: dict | None = None, status: str = "running") -> list[dict]:
    steps = []
    for number in numbers:
        fields = (local or {}).get(number, {})
        health = protocol.local_health(fields.get("norm", 1.0 + rank), fields.get("nonfinite", 0), compute_time=0.1)
        steps.append(step_doc(number, local=health))
    batch = BatchDocument.model_validate(batch_doc(rank=rank, steps=steps, status=status))
    stored = store_batch(session, find_run(session, "r1", EVERYTHING), batch, CONFIG)
    session.commit()
    return [event for event in stored.new_events if event["kind"].startswith("rank_")]


def test_batches_are_judged_when_the_last_rank_arrives_and_a_dead_rank_never_blocks(database_url: str) -> None:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    with db.make_session_factory(engine)() as session:
        for rank in range(WORLD):
            register_run(session, RunDocument.model_validate({**run_doc(rank=rank), "world_size": WORLD}), EVERYTHING)
        session.commit()
        inf = {3: {"norm": math.inf, "nonfinite": 1}}
        assert _post(session, 0, [1, 2, 3]) == []
        assert _post(session, 2, [1, 2, 3], inf) == []  # ranks 1 and 3 not in yet: nothing judged
        assert _post(session, 1, [1, 2, 3]) == []
        (event,) = _post(session, 3, [1, 2, 3])  # the last rank of steps 1-3
        assert (event["rank"], event["step"], event["details"]["ranks"]) == (2, 3, [2])
        judge_row = session.get(RankJudge, find_run(session, "r1", EVERYTHING).id)
        assert judge_row.judged_through == 3 and session.execute(select(RankInbox)).first() is None
        # Rank 3 dies: ranks 0-2 go on; while 2 of them are behind, nothing is judged without rank 3.
        last = 3 + CONFIG.rank_wait_steps + 2
        _post(session, 0, list(range(4, last + 1)))
        session.refresh(judge_row)
        assert judge_row.judged_through == 3
        # Once a majority is rank_wait_steps past rank 3's last step, rank 3 is not waited for any more.
        for rank in (1, 2):
            _post(session, rank, list(range(4, last + 1)))
        session.refresh(judge_row)
        assert judge_row.judged_through == last
        assert judge_row.state["gaps"] == [[4, last, [3]]]
        # A late step of rank 3 is stored for its own views and judged no more.
        assert _post(session, 3, [4], {4: {"norm": math.nan, "nonfinite": 1}}) == []
        kinds = session.execute(select(Event.kind, Event.rank, Event.step)).all()
        assert [tuple(row) for row in kinds] == [("rank_nonfinite", 2, 3)]
        assert judge_row.events_total == {"rank_nonfinite": {"2": 1}}
        # A rank that sent its last batch is not waited for: the job ends with the others' last step.
        _post(session, 0, [last + 1, last + 2])
        _post(session, 1, [last + 1], status="finished")
        _post(session, 2, [last + 1, last + 2], status="finished")
        session.refresh(judge_row)
        assert judge_row.judged_through == last + 2  # missing rank 1 is done, rank 3 stalled
        _post(session, 0, [last + 3], status="finished")
        session.refresh(judge_row)
        assert judge_row.judged_through == last + 3
        assert judge_row.state["gaps"][-3:] == [
            [4, last + 1, [3]],
            [last + 2, last + 2, [1, 3]],
            [last + 3, last + 3, [1, 2, 3]],
        ]
    engine.dispose()
