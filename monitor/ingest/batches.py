"""Registering runs and storing batches: one transaction per batch, idempotent on (run, rank, step).

A retried batch stores nothing twice. A step that arrives again with different content
keeps the first version and records a :class:`~numwatch.monitor.store.models.Conflict`, unless
the copy only adds statistics a client measures after sending the step (``SUPPLEMENT_STATS``:
the final weights' quantization at ``close()``), which extend the stored step. Detectors run on
the newly stored steps only, and every counter of ``rank_state`` moves in the same
transaction as the rows it counts, so all replicas on one database agree.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.detectors import forward_events, gemm_events, spikes
from numwatch.monitor.detectors import rules as detectors
from numwatch.monitor.errors import IngestError, NotFound
from numwatch.monitor.ingest import cross_rank
from numwatch.monitor.ingest.schemas import (
    MAX_RUN_NAME,
    BatchDocument,
    EventDocument,
    HistogramDocument,
    IngestResult,
    RunDocument,
    StepDocument,
)
from numwatch.monitor.reads import forward
from numwatch.monitor.reads.queries import find_run, visible_run
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store import rollups
from numwatch.monitor.store.auth import Principal
from numwatch.monitor.store.models import (
    DELETING,
    GRAD_NORM_BUCKETS,
    Conflict,
    Event,
    ForwardStats,
    Histogram,
    RankState,
    Run,
    RunInstance,
)
from numwatch.monitor.store.packing import compress_histogram_array

# The run row is written at most this often by running batches: every rank of a job writes to it, and a
# write holds the row until its transaction ends, so writing it with every batch would queue the ranks.
LAST_SEEN_RESOLUTION = timedelta(seconds=5)
# Statistics a re-sent copy of a stored step may add (see _supplements).
SUPPLEMENT_STATS = frozenset(protocol.QUANT_SQNR_STATS.values())


@dataclass
class StoredBatch:
    result: IngestResult
    new_events: list[dict[str, Any]]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(moment: datetime) -> datetime:
    """``moment`` in UTC (SQLite hands back naive datetimes)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _schema_difference(old: list[dict], new: list[dict]) -> str | None:
    old_key, new_key = protocol.tensor_schema_key(old), protocol.tensor_schema_key(new)
    if old_key == new_key:
        return None
    if len(old_key) != len(new_key):
        return f"{len(new_key)} tensors, the registered schema has {len(old_key)}"
    index = next(i for i, (a, b) in enumerate(zip(old_key, new_key, strict=True)) if a != b)
    return f"tensor {index} is {new_key[index]}, the registered schema has {old_key[index]}"


@dataclass
class Registration:
    run: Run
    created: bool
    renamed: bool  # stored under another name than the one asked for


def _free_name(session: Session, name: str) -> str:
    """``name-2``, ``name-3``...: the first that no run has (the name cut to keep within the limit)."""
    for number in itertools.count(2):
        suffix = f"-{number}"
        candidate = name[: MAX_RUN_NAME - len(suffix)] + suffix
        if session.execute(select(Run.id).where(Run.name == candidate)).first() is None:
            return candidate
    raise AssertionError("unreachable")


def register_run(session: Session, document: RunDocument, principal: Principal) -> Registration:
    """Register (run, rank) of one instance. Registering again (a retry, another rank) is a
    no-op. A name that another instance holds gets a new run ``name-2``... unless the
    document resumes it; documents without an instance (protocol 1 and 2) share the name."""
    if not principal.may_access(document.project):
        raise IngestError(403, f"this token may not write runs of project {document.project!r}")
    tensors = [tensor.model_dump() for tensor in document.tensors]
    now = utcnow()
    claim = session.get(RunInstance, document.instance) if document.instance is not None else None
    run = (
        session.get(Run, claim.run_id)
        if claim is not None
        else session.execute(select(Run).where(Run.name == document.run)).scalar_one_or_none()
    )
    name, renamed, offset = document.run, False, 0
    if claim is None and run is not None and document.instance is not None:
        if document.resume:
            offset = step_blocks.run_last_step(session, run.id)
        else:
            name, renamed, run = _free_name(session, document.run), True, None
    created = run is None
    if run is None:
        run = Run(
            name=name,
            project=document.project,
            format=document.format,
            world_size=document.world_size,
            tensors=tensors,
            modules=document.modules,
            config=document.config,
            status="running",
            started_at=datetime.fromtimestamp(document.started_at, timezone.utc),
            created_at=now,
            last_seen_at=now,
        )
        session.add(run)
        session.flush()
    else:
        if run.status == DELETING:
            raise IngestError(
                409, f"run {document.run!r} is being deleted; register it again once it is gone, or use a new run name"
            )
        if run.project != document.project or not principal.may_access(run.project):
            raise IngestError(
                409 if principal.may_access(run.project) else 403, f"run {document.run!r} belongs to another project"
            )
        difference = _schema_difference(run.tensors, tensors)
        if difference:
            raise IngestError(
                409,
                f"run {document.run!r} is registered with a different tensor schema: {difference}; use a new run name",
            )
        run.world_size = max(run.world_size, document.world_size)
        run.last_seen_at = now
    if claim is None and document.instance is not None:
        session.add(
            RunInstance(
                instance=document.instance,
                run_id=run.id,
                requested_name=document.run,
                step_offset=offset,
                created_at=now,
            )
        )
    if session.get(RankState, (run.id, document.rank)) is None:
        session.add(
            RankState(
                run_id=run.id,
                rank=document.rank,
                grad_norm_bucket_counts=[0] * (len(GRAD_NORM_BUCKETS) + 1),
                lr=[],
                events_total={},
            )
        )
    return Registration(run, created, renamed or run.name != document.run)


def batch_target(
    session: Session, requested: str, document: BatchDocument, principal: Principal
) -> tuple[Run, BatchDocument]:
    """The run a batch posted under ``requested`` goes to, and the batch with its step numbers
    moved past the resumed run's earlier steps."""
    if document.instance is None:
        return find_run(session, requested, principal), document
    found = session.execute(
        select(RunInstance, Run)
        .join(Run, Run.id == RunInstance.run_id)
        .where(RunInstance.instance == document.instance)
    ).first()
    claim, run = found if found is not None else (None, None)
    if claim is None or claim.requested_name != requested:
        raise NotFound(
            f"run {requested!r} has no registered instance {document.instance!r} "
            f"(register it with POST {protocol.RUNS_PATH} first)"
        )
    assert run is not None
    run = visible_run(run, run.name, principal)
    if not claim.step_offset:
        return run, document
    shifted = document.model_copy(deep=True)
    items: tuple[StepDocument | HistogramDocument | EventDocument, ...] = (
        *shifted.steps,
        *shifted.histograms,
        *shifted.events,
    )
    for item in items:
        item.step += claim.step_offset
    return run, shifted


def _decode_steps(document: BatchDocument, n_tensors: int, n_modules: int) -> list[dict[str, bytes]]:
    """Each step's raw stat bytes, with the length of every array checked against the run's schema."""
    decoded = []
    for i, step in enumerate(document.steps):
        raw = {}
        if document.protocol < protocol.FORWARD_STATS_VERSION:
            for name in protocol.V3_STEP_FIELDS:
                if getattr(step, name) not in (None, False):
                    raise IngestError(
                        422,
                        f"steps[{i}].{name}: needs protocol {protocol.FORWARD_STATS_VERSION}, the batch says "
                        f"{document.protocol}",
                    )
        for name in ("local", "replicated_by"):
            if getattr(step, name) is not None and document.protocol < protocol.LOCAL_HEALTH_VERSION:
                needs = f"needs protocol {protocol.LOCAL_HEALTH_VERSION}, the batch says {document.protocol}"
                raise IngestError(422, f"steps[{i}].{name}: {needs}")
        for name, values in step.tensors.items():
            if name in protocol.V2_TENSOR_STATS and document.protocol < 2:
                raise IngestError(
                    422, f"steps[{i}].tensors.{name}: needs protocol 2, the batch says {document.protocol}"
                )
            try:
                raw[name] = protocol.check_raw(values, protocol.TENSOR_STATS[name], n_tensors)
            except ValueError as error:
                raise IngestError(
                    422, f"steps[{i}].tensors.{name}: {error} (the run has {n_tensors} tensors)"
                ) from None
        if step.activations is not None:
            for name in protocol.ACTIVATION_STATS:
                try:
                    raw[f"activation_{name}"] = protocol.check_raw(
                        getattr(step.activations, name), protocol.ACTIVATION_STATS[name], n_modules
                    )
                except ValueError as error:
                    raise IngestError(
                        422, f"steps[{i}].activations.{name}: {error} (the run traces {n_modules} modules)"
                    ) from None
        decoded.append(raw)
    for i, histogram in enumerate(document.histograms):
        for name, per_tensor in protocol.HISTOGRAM_LENGTHS.items():
            try:
                protocol.check_raw(getattr(histogram, name), protocol.HISTOGRAM_DTYPES[name], n_tensors * per_tensor)
            except ValueError as error:
                raise IngestError(422, f"histograms[{i}].{name}: {error}") from None
    return decoded


def _step_row(step: Any, raw: dict[str, bytes]) -> dict[str, Any]:
    """A step of a batch as the store keeps it and the detectors read it."""
    return {
        "step": step.step,
        "time": step.time,
        "step_time": step.step_time,
        "loss": step.loss,
        "loss_scale": step.loss_scale,
        "new_loss_scale": step.new_loss_scale,
        "scale_decision": step.scale_decision,
        "skipped": step.skipped,
        "global_grad_norm": step.global_grad_norm,
        "headroom_bits": step.headroom_bits,
        "clip_coef": step.clip_coef,
        "post_clip_grad_norm": step.post_clip_grad_norm,
        "clipped": step.clipped,
        "lr": [protocol.encode_float(v) for v in step.lr],
        "scalars": {k: protocol.encode_float(v) for k, v in step.scalars.items()},
        "tensors": {
            name: np.frombuffer(value, protocol.TENSOR_STATS[name])
            for name, value in raw.items()
            if name in protocol.TENSOR_STATS
        },
        **{name: raw.get(name) for name in step_blocks.ACTIVATION_ARRAYS},
        **_local_fields(step.local),
        "replicated_by": step.replicated_by,
    }


def _local_fields(local: Any) -> dict[str, Any]:
    """A step's ``local`` part as the step row's fields (all None without one)."""
    if local is None:
        return dict.fromkeys(cross_rank.LOCAL_FIELDS)
    return {
        "local_grad_norm": local.grad_norm,
        "local_nonfinite": local.nonfinite,
        "compute_time": local.compute_time,
        "nonfinite_tensors": local.nonfinite_tensors,
        "checksum": local.checksum,
    }


def _same_float(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _same_scalars(first: dict[str, Any], row: dict[str, Any]) -> bool:
    return first["skipped"] == row["skipped"] and all(
        _same_float(first[key], row[key]) for key in ("loss", "loss_scale", "global_grad_norm")
    )


def _same_arrays(first: dict[str, np.ndarray], row: dict[str, np.ndarray], names: set[str]) -> bool:
    return all(first[name].tobytes() == row[name].tobytes() for name in names)


def _same_content(first: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether ``row`` repeats ``first`` (a stored step, or an earlier copy in the same batch)."""
    old, new = first["tensors"], row["tensors"]
    return _same_scalars(first, row) and old.keys() == new.keys() and _same_arrays(old, new, set(old))


def _supplements(first: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether ``row`` is ``first`` plus statistics a client may add after sending a step
    (the final weights' quantization SQNR measured at close()): then it is no conflict."""
    old, new = first["tensors"], row["tensors"]
    added = set(new) - set(old)
    return (
        _same_scalars(first, row)
        and bool(added)
        and added <= SUPPLEMENT_STATS
        and set(old) <= set(new)
        and _same_arrays(old, new, set(old))
    )


def _not_finite(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


def _update_rank_state(state: RankState, views: list[dict[str, Any]], numel: np.ndarray) -> None:
    """Counters from the newly stored ``views`` (ascending); last values from the highest step."""
    state.steps_total += len(views)
    state.skipped_steps_total += sum(view["skipped"] for view in views)
    state.clipped_steps_total += sum(view["clipped"] for view in views)
    # An overflow the GradScaler absorbed (skipped step, scale backed off) is AMP working as
    # designed and is counted as a skipped step; only non-finite gradients that reached the
    # optimizer count here (and page).
    state.nonfinite_steps_total += sum(detectors.has_nonfinite_grad(view) and not view["skipped"] for view in views)
    state.nonfinite_loss_total += sum(_not_finite(view["loss"]) for view in views)
    state.loss_scale_backoffs_total += sum(view["scale_decision"] == "backoff" for view in views)
    state.loss_scale_growths_total += sum(view["scale_decision"] == "growth" for view in views)
    norms = np.array(
        [view["global_grad_norm"] for view in views if view["global_grad_norm"] is not None], dtype=np.float64
    )
    buckets = np.asarray(state.grad_norm_bucket_counts or [0] * (len(GRAD_NORM_BUCKETS) + 1), dtype=np.int64)
    finite = norms[np.isfinite(norms)]
    # Non-finite norms go to the +Inf bucket (the last); finite ones to the first bound >= value.
    buckets += np.bincount(np.searchsorted(GRAD_NORM_BUCKETS, finite, side="left"), minlength=len(buckets))[
        : len(buckets)
    ]
    buckets[-1] += len(norms) - len(finite)
    state.grad_norm_bucket_counts = buckets.tolist()
    state.grad_norm_sum = float(state.grad_norm_sum + finite.sum())

    last = views[-1]
    if last["step"] >= state.last_step:
        state.last_step, state.last_step_time = last["step"], last["time"]
        state.loss, state.global_grad_norm, state.headroom_bits = (
            last["loss"],
            last["global_grad_norm"],
            last["headroom_bits"],
        )
        state.lr = list(last["lr"] or [])
        state.loss_scale = last["new_loss_scale"] if last["new_loss_scale"] is not None else last["loss_scale"]
        grad_norm = last["tensors"].get("grad_norm")
        if grad_norm is not None and len(grad_norm):
            state.max_layer_grad_norm = float(np.nan if np.isnan(grad_norm).all() else np.nanmax(grad_norm))
        state.layers_nonfinite = int(detectors.nonfinite_tensor_mask(last["tensors"]).sum())
    for view in reversed(views):
        if all(name in view["tensors"] for name in protocol.FORMAT_COUNT_STATS) and numel.sum() > 0:
            total = float(numel.sum())
            state.zero_ratio, state.underflow_ratio, state.subnormal_ratio, state.overflow_ratio = (
                float(view["tensors"][name].sum()) / total for name in protocol.FORMAT_COUNT_STATS
            )
            break
    for view in reversed(views):
        if view.get("local_grad_norm") is not None:
            state.local_grad_norm, state.local_nonfinite = view["local_grad_norm"], view["local_nonfinite"]
            state.compute_time = view["compute_time"]
            break
    _set_sampled_means(state, views, protocol.UPDATE_STATS)
    _set_sampled_means(state, views, protocol.ADAM_HEALTH_STATS)


def _update_quant_state(state: RankState, views: list[dict[str, Any]]) -> None:
    """The lowest SQNR per scheme from the highest-numbered view that has quantization stats."""
    for view in sorted(views, key=lambda v: v["step"], reverse=True):
        if any(stat in view["tensors"] for stat in protocol.QUANT_SQNR_STATS.values()):
            # The worst tensor per scheme (tensors that are not quantized report NaN).
            state.quant_sqnr_min = {
                scheme: protocol.encode_float(float(np.nanmin(values)))
                for scheme, stat in protocol.QUANT_SQNR_STATS.items()
                if (values := view["tensors"].get(stat)) is not None and not np.isnan(values).all()
            }
            break


def _set_sampled_means(state: RankState, views: list[dict[str, Any]], names: tuple[str, ...]) -> None:
    """Each stat's mean over the tensors where it is finite, from the last view that has any of them."""
    for view in reversed(views):
        if any(name in view["tensors"] for name in names):
            for name in names:
                values = view["tensors"].get(name)
                if values is not None and np.isfinite(values).any():
                    setattr(state, name, float(np.nanmean(np.where(np.isfinite(values), values, np.nan))))
            break


def _existing_event_keys(
    session: Session, run_id: int, rank: int, events: list[dict[str, Any]]
) -> set[tuple[int, str]]:
    if not events:
        return set()
    keys = {(event["step"], event["kind"]) for event in events}
    rows = session.execute(
        select(Event.step, Event.kind).where(
            Event.run_id == run_id, Event.rank == rank, tuple_(Event.step, Event.kind).in_(list(keys))
        )
    ).all()
    return {(row.step, row.kind) for row in rows}


def _locked_rank_state(session: Session, run_id: int, rank: int) -> RankState | None:
    """The (run, rank)'s state row, write-locked until the transaction ends.

    Batches of one (run, rank) can arrive at once (two replicas behind a load balancer, or a
    client's retry while the first attempt is still in flight). Each reads the counters,
    adds its steps and writes them back, so without a lock the later commit overwrites the
    earlier one's increments and last values. A no-op UPDATE as the transaction's first
    write takes the row lock on PostgreSQL and the database write lock on SQLite (where a
    SELECT ... FOR UPDATE does not exist), so the second batch waits, then reads the first's
    committed state and steps. The UPDATE returns the row it locked (one statement, not two).
    """
    key = (RankState.run_id == run_id) & (RankState.rank == rank)
    return session.execute(
        update(RankState)
        .where(key)
        .values(last_step=RankState.last_step)
        .returning(RankState)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).scalar_one_or_none()


def store_batch(session: Session, run: Run, document: BatchDocument, config: detectors.DetectorConfig) -> StoredBatch:
    """Store ``document`` (caller commits); what was new, and the events it produced."""
    n_tensors, n_modules = len(run.tensors), len(run.modules)
    decoded = _decode_steps(document, n_tensors, n_modules)
    rank = document.rank
    state = _locked_rank_state(session, run.id, rank)
    if state is None:
        raise IngestError(
            409, f"rank {rank} of run {run.name!r} is not registered: POST the run document for this rank first"
        )

    # The rank's state goes out in one UPDATE (when judging across ranks reads it, or at commit), not once
    # per query after each change.
    with session.no_autoflush:
        # Within one batch the first copy of a step wins too.
        rows_by_step: dict[int, dict[str, Any]] = {}
        conflicts: list[int] = []
        for step, raw in zip(document.steps, decoded, strict=True):
            row = _step_row(step, raw)
            first = rows_by_step.setdefault(step.step, row)
            if first is not row and not _same_content(first, row):
                if _supplements(first, row):
                    rows_by_step[step.step] = row
                else:
                    conflicts.append(step.step)
        reader = step_blocks.Reader(session, run.id, rank, n_tensors, n_modules)
        # Steps past the rank's last stored step (the usual batch) cannot be stored already.
        stored = (
            {
                step["step"]: step
                for step in reader.range(min(rows_by_step), max(rows_by_step))
                if step["step"] in rows_by_step
            }
            if rows_by_step and min(rows_by_step) <= state.last_step
            else {}
        )
        new_rows = [row for number, row in sorted(rows_by_step.items()) if number not in stored]
        supplemented = []
        for number, row in sorted(rows_by_step.items()):
            if number in stored and not _same_content(stored[number], row):
                if _supplements(stored[number], row):
                    supplemented.append(row)
                else:
                    conflicts.append(number)
        reader.replace({row["step"]: row for row in supplemented})
        now = time.time()
        if conflicts:
            session.execute(
                insert(Conflict),
                [
                    {"run_id": run.id, "rank": rank, "step": n, "batch_id": document.batch_id, "received_at": now}
                    for n in conflicts
                ],
            )

        new_events: list[dict[str, Any]] = [event.model_dump() for event in document.events]
        numel = np.array([math.prod(t["shape"]) for t in run.tensors], dtype=np.float64)
        if new_rows:
            views = new_rows
            # One read serves the rules (the last steps whole) and the spikes (more steps' scalars).
            spike_count = 2 * config.spike_window
            recent = reader.last(new_rows[0]["step"], max(config.window, spike_count), wanted=(), full=config.window)
            history = recent[-config.window :]
            step_blocks.store(session, run.id, rank, new_rows)
            if run.world_size > 1:
                cross_rank.inbox(session, run.id, rank, new_rows)
            names = [t["name"] for t in run.tensors]
            new_events += detectors.detect(history, views, config, tensor_names=names, tensor_numel=numel)
            low_precision_events, state.gemm_state = gemm_events.detect(
                dict(state.gemm_state or {}), views, config, names
            )
            new_events += low_precision_events
            # Every stored global gradient norm is counted in the rank's histogram.
            absent = () if sum(state.grad_norm_bucket_counts or ()) else ("global_grad_norm",)
            spike_history = spikes.stored_history(
                session, run.id, rank, new_rows[0]["step"], spike_count, absent, recent[-spike_count:]
            )
            spike_events, judged = spikes.detect(spike_history, views, config)
            new_events += spike_events
            state.spike_state = spikes.advance_score(state.spike_state, judged, config.spike_score_steps)
            new_steps = {row["step"] for row in new_rows}
            forward_rows = [
                forward_stats
                for step in document.steps
                if step.step in new_steps and (forward_stats := forward.forward_row(run.id, rank, step)) is not None
            ]
            forward_rows = sorted(
                {row["step"]: row for row in reversed(forward_rows)}.values(), key=lambda row: row["step"]
            )  # first copy wins
            rollups.record(session, run.id, rank, views, n_tensors, state.last_step)
        else:
            views, forward_rows = [], []
        if forward_rows:
            session.execute(insert(ForwardStats), forward_rows)
            previous = forward.previous_row(session, run.id, rank, forward_rows[0]["step"])
            new_events += forward_events.detect(
                previous, forward_rows, config, {row["step"]: row["time"] for row in new_rows}
            )
            forward.update_rank_state(state, forward_rows)

        histogram_keys = {(h.step, h.kind) for h in document.histograms}
        if histogram_keys:
            existing = {
                tuple(row)
                for row in session.execute(
                    select(Histogram.step, Histogram.kind).where(
                        Histogram.run_id == run.id,
                        Histogram.rank == rank,
                        tuple_(Histogram.step, Histogram.kind).in_(list(histogram_keys)),
                    )
                )
            }
            fresh: dict[tuple[int, str], dict[str, Any]] = {}
            for h in document.histograms:
                if (h.step, h.kind) not in existing:
                    fresh.setdefault(
                        (h.step, h.kind),
                        {
                            "run_id": run.id,
                            "rank": rank,
                            "step": h.step,
                            "kind": h.kind,
                            **{
                                name: compress_histogram_array(name, getattr(h, name))
                                for name in protocol.HISTOGRAM_LENGTHS
                            },
                        },
                    )
            if fresh:
                session.execute(Histogram.__table__.insert(), list(fresh.values()))

        existing_events = _existing_event_keys(session, run.id, rank, new_events)
        unique_events: dict[tuple[int, str], dict[str, Any]] = {}
        for event in new_events:
            key = (event["step"], event["kind"])
            if key not in existing_events:
                unique_events.setdefault(key, event)
        stored_events = list(unique_events.values())
        if stored_events:
            session.execute(insert(Event), [{"run_id": run.id, "rank": rank, **event} for event in stored_events])

        if views:
            _update_rank_state(state, views, numel)
        _update_quant_state(state, views + supplemented)
        if supplemented:  # the added stats only: the step's other series are in the rollups already
            added = [
                {"step": view["step"], "tensors": {k: v for k, v in view["tensors"].items() if k in SUPPLEMENT_STATS}}
                for view in supplemented
            ]
            rollups.record(session, run.id, rank, added, n_tensors, state.last_step, scalars=False)
        _count_events(state, stored_events)
    if run.world_size > 1:
        stored_events += cross_rank.judge(session, run, config, rank if document.status != "running" else None)
    now_utc = utcnow()
    changed = document.status != "running" or run.status != "running"
    if changed or now_utc - _aware(run.last_seen_at) >= LAST_SEEN_RESOLUTION:
        run.last_seen_at = now_utc
    if changed:
        run.status = document.status
        run.finished_at = run.last_seen_at if document.status != "running" else None
    result = IngestResult(
        stored_steps=len(new_rows),
        duplicate_steps=len(document.steps) - len(new_rows),
        conflicting_steps=len(conflicts),
        events=len(stored_events),
    )
    return StoredBatch(result, stored_events)


def _count_events(state: RankState, events: list[dict[str, Any]]) -> None:
    totals = dict(state.events_total)
    for event in events:
        totals[event["kind"]] = totals.get(event["kind"], 0) + 1
    state.events_total = totals
