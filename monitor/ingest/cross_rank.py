"""Judging a multi-rank run's steps across its ranks, as the ranks' batches arrive.

Every new step of a rank of a run with more than one rank goes into ``rank_inbox`` (insert
only: ranks never wait on each other's rows). Then one batch at a time per run judges the
steps now ready, in step order (:func:`_ready_steps` says when a step is ready,
:mod:`numwatch.monitor.detectors.ranks` what is judged), advances ``rank_judge.judged_through``
and deletes the judged rows.

On PostgreSQL the judging batch holds the run's ``rank_judge`` row; a batch that finds it
held skips judging (``SKIP LOCKED``) instead of queueing all ranks behind one row: its steps
are judged by the next batch of any rank. A run's last batches (a status other than
"running") wait for the row instead, so the end of a run is judged too. SQLite runs one
write transaction at a time anyway.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from numwatch.monitor.detectors import ranks as rank_detectors
from numwatch.monitor.detectors.rules import DetectorConfig
from numwatch.monitor.store.models import Event, RankInbox, RankJudge, RankState, Run

# Steps one batch judges at most (the next batches judge the rest), so no batch takes long.
MAX_STEPS_PER_BATCH = 64
# A step's ``local`` part as step row fields.
LOCAL_FIELDS = ("local_grad_norm", "local_nonfinite", "compute_time", "nonfinite_tensors", "checksum")
INBOX_FIELDS = ("loss", "local_grad_norm", "local_nonfinite", "compute_time", "checksum", "nonfinite_tensors")


def inbox(session: Session, run_id: int, rank: int, rows: list[dict[str, Any]]) -> None:
    """Queue a rank's newly stored steps for judging across ranks."""
    if rows:
        session.execute(
            insert(RankInbox),
            [
                {"run_id": run_id, "step": row["step"], "rank": rank, "time": row["time"]}
                | {name: row.get(name) for name in INBOX_FIELDS}
                for row in rows
            ],
        )


def _judge_row(session: Session, run_id: int, wait: bool) -> RankJudge | None:
    """The run's judge row, write-locked (None: another batch holds it and ``wait`` is False)."""
    query = select(RankJudge).where(RankJudge.run_id == run_id).execution_options(populate_existing=True)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=not wait)
    judge = session.execute(query).scalar_one_or_none()
    if judge is not None:
        return judge
    if session.execute(select(RankJudge.run_id).where(RankJudge.run_id == run_id)).first() is not None:
        return None  # held by another batch (SKIP LOCKED)
    if session.execute(select(RankInbox.run_id).where(RankInbox.run_id == run_id)).first():
        # The run's first multi-rank batch: two may race to create the row; the loser's commit fails and retries.
        judge = RankJudge(run_id=run_id, judged_through=0, state=rank_detectors.empty_state(), events_total={})
        session.add(judge)
        session.flush()
    return judge


def _progress(session: Session, run: Run) -> dict[int, int]:
    """Each registered rank's highest stored step."""
    rows = session.execute(select(RankState.rank, RankState.last_step).where(RankState.run_id == run.id))
    return {rank: last for rank, last in rows}


def _majority_step(progress: dict[int, int], world_size: int) -> int:
    """The highest step that more than half the ranks (one of two) stored: a step far enough behind it is not
    waited for. A majority, so that one rank whose batch comes early does not judge the others' steps early."""
    last = sorted(progress.values(), reverse=True)
    index = world_size // 2 if world_size > 2 else 0
    return last[index] if index < len(last) else 0


def _ready_steps(session: Session, run: Run, after: int, finished: set[int], config: DetectorConfig) -> list[int]:
    """The queued steps after ``after`` that can be judged now, ascending, at most ``MAX_STEPS_PER_BATCH``. A step
    is ready when every rank sent it; or when it is ``rank_wait_steps`` behind the step a majority reached; or
    when every rank missing it is done (sent its last batch) or stalled (its last stored step that far behind
    the majority's). Counted first, so a backlog still waiting for a rank is not read again and again."""
    counts = session.execute(
        select(RankInbox.step, func.count())
        .where(RankInbox.run_id == run.id, RankInbox.step > after)
        .group_by(RankInbox.step)
        .order_by(RankInbox.step)
        .limit(MAX_STEPS_PER_BATCH)  # the loop below looks at no more
    ).all()
    if not counts:
        return []
    progress = _progress(session, run)
    reached = _majority_step(progress, run.world_size)
    ready = []
    for step, count in counts:
        if count < run.world_size and step > reached - config.rank_wait_steps:
            present = set(
                session.execute(
                    select(RankInbox.rank).where(RankInbox.run_id == run.id, RankInbox.step == step)
                ).scalars()
            )
            missing = set(range(run.world_size)) - present
            if not all(
                rank in finished or progress.get(rank, 0) <= reached - config.rank_wait_steps for rank in missing
            ):
                break  # wait for the missing ranks
        ready.append(step)
        if len(ready) == MAX_STEPS_PER_BATCH:
            break
    return ready


def judge(session: Session, run: Run, config: DetectorConfig, finished_rank: int | None) -> list[dict[str, Any]]:
    """Judge the run's steps that are ready; the events stored (each with its ``rank``). ``finished_rank``:
    the rank whose last batch this is (no step it lacks is waited for any more)."""
    judge_row = _judge_row(session, run.id, wait=finished_rank is not None)
    if judge_row is None:
        return []
    state = dict(judge_row.state) or rank_detectors.empty_state()
    finished = set(state.get("finished", [])) | ({finished_rank} if finished_rank is not None else set())
    state["finished"] = sorted(finished)
    ready = _ready_steps(session, run, judge_row.judged_through, finished, config)
    by_step: dict[int, dict[int, rank_detectors.RankHealth]] = defaultdict(dict)
    if ready:
        rows = session.execute(
            select(RankInbox).where(RankInbox.run_id == run.id, RankInbox.step.between(ready[0], ready[-1]))
        ).scalars()
        for row in rows:
            by_step[row.step][row.rank] = rank_detectors.RankHealth(
                rank=row.rank, time=row.time, **{name: getattr(row, name) for name in INBOX_FIELDS}
            )
    judged = judge_row.judged_through
    events: list[dict[str, Any]] = []
    for step in ready:
        events += [
            {"rank": rank, **event}
            for rank, event in rank_detectors.judge_step(step, by_step[step], run.world_size, state, config)
        ]
        judged = step
    if judged > judge_row.judged_through or finished_rank is not None:
        # Judged rows go, and so do late ones of steps judged before (stored for their rank's views).
        session.execute(delete(RankInbox).where(RankInbox.run_id == run.id, RankInbox.step <= judged))
    if events:
        session.execute(insert(Event), [{"run_id": run.id, **event} for event in events])
        totals = {kind: dict(counts) for kind, counts in judge_row.events_total.items()}
        for event in events:
            counts = totals.setdefault(event["kind"], {})
            counts[str(event["rank"])] = counts.get(str(event["rank"]), 0) + 1
        judge_row.events_total = totals
    judge_row.judged_through, judge_row.state = judged, state
    return events
