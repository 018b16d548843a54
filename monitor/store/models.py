"""SQLAlchemy 2 models of the collector's store (schema changes go through Alembic).

Steps are stored several to a row (``step_blocks``, see ``numwatch.monitor.store.blocks``):
their scalars, and their per-tensor arrays compressed (dtypes from
``numwatch.protocol.TENSOR_STATS``; each array has one element per tensor of the run's
schema). ``rollups`` summarise every series per
bucket of steps at a few resolutions (``numwatch.monitor.store.rollups``), so whole-run reads
cost what they return. Run-level state that /metrics
serves (counters, last values) lives in ``rank_state`` and is updated in the same
transaction as the steps it counts, so every replica sharing the database reports the
same numbers.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from numwatch.protocol import decode_float

# Upper bounds of the classic histogram of the global gradient norm exported to
# Prometheus (log-spaced, one per decade; +Inf is implicit). Spikes between scrapes
# survive in these counts.
GRAD_NORM_BUCKETS: tuple[float, ...] = tuple(10.0**e for e in range(-8, 9))
DELETING = "deleting"  # a run's status while its rows are deleted


class ExactFloat(TypeDecorator[float]):
    """A float column that keeps NaN and ±Inf on every backend.

    PostgreSQL's double precision holds them natively; SQLite turns a NaN REAL into
    NULL, so there NaN is stored as the text 'NaN' (a REAL-affinity column keeps text
    that does not look numeric) and read back as float('nan').
    """

    impl = Float(precision=53)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        value = float(value)
        if dialect.name == "sqlite" and math.isnan(value):
            return "NaN"
        return value

    def bind_processor(self, dialect: Any) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # Float's own bind processor would turn the 'NaN' text back into a float (stored as NULL).
        def process(value: Any) -> Any:
            return self.process_bind_param(value, dialect)

        return process

    def process_result_value(self, value: Any, dialect: Any) -> float | None:
        stored: float | str | None = value  # a REAL, or SQLite's 'NaN' text
        return decode_float(stored)


class Base(DeclarativeBase):
    if TYPE_CHECKING:
        # Each model maps one Table (no joins or other selectables), which the Core statements here rely on.
        __table__: ClassVar[Table]


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # sha256 hex of the token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Run(Base):
    __tablename__ = "runs"
    # Run ids are never reused: rows a hand-made delete left behind can never join a new run.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    format: Mapped[str] = mapped_column(String(16))
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    tensors: Mapped[list[Any]] = mapped_column(JSON)  # [{"name","shape","dtype","group"}]
    modules: Mapped[list[Any]] = mapped_column(JSON, default=list)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # running | finished | crashed | deleting; "stale" is derived at read time from last_seen_at.
    # A deleting run is invisible and refuses writes while its rows go, a bounded transaction at a time.
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RunInstance(Base):
    """One watching process (all ranks of one job) and the run its data goes to: the run of
    the name it asked for, a ``-2``... run when another instance held that name, or the same
    run when it resumed it (its step numbers then start after ``step_offset``)."""

    __tablename__ = "run_instances"

    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    requested_name: Mapped[str] = mapped_column(String(512))
    step_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StepBlock(Base):
    """Steps of one (run, rank), several to a row (``numwatch.monitor.store.blocks``): those steps of
    one batch that were not stored before, at most ``MAX_STEPS`` of them within ``MAX_SPAN`` numbers."""

    __tablename__ = "step_blocks"
    __table_args__ = (Index("ix_step_blocks_last_step", "run_id", "rank", "last_step"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    last_step: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    names: Mapped[str] = mapped_column(Text)  # ",name,...,": the arrays and scalars some step of the block has
    header: Mapped[bytes] = mapped_column(LargeBinary)  # compressed JSON: per step its scalars and arrays
    arrays: Mapped[bytes] = mapped_column(LargeBinary)  # compressed segments of the stats of every step
    sampled: Mapped[bytes] = mapped_column(LargeBinary)  # and of the sampled ones


class Histogram(Base):
    __tablename__ = "histograms"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # grad | weight
    # Each compressed from the wire's raw arrays (numwatch.monitor.store.packing.compress_histogram_array).
    exponent: Mapped[bytes] = mapped_column(LargeBinary)  # int64 n_tensors x EXPONENT_BINS
    linear_min: Mapped[bytes] = mapped_column(LargeBinary)  # float32 n_tensors
    linear_max: Mapped[bytes] = mapped_column(LargeBinary)  # float32 n_tensors
    linear: Mapped[bytes] = mapped_column(LargeBinary)  # int64 n_tensors x LINEAR_BINS


class ForwardStats(Base):
    """The forward-pass statistics of one sampled step: attention calls in forward order, output logits."""

    __tablename__ = "forward_stats"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    attention_calls: Mapped[list[Any]] = mapped_column(JSON, default=list)  # calling module names
    attention_logit_max: Mapped[list[Any]] = mapped_column(JSON, default=list)  # one protocol-encoded float per call
    log_z_mean: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    log_z_max: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    logit_absmax: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)


class Rollup(Base):
    """A bucket of ``level`` steps of one series (a step scalar or a per-tensor stat), summarised."""

    __tablename__ = "rollups"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    series: Mapped[str] = mapped_column(String(40), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # first step = bucket * level
    data: Mapped[bytes] = mapped_column(LargeBinary)  # numwatch.monitor.store.rollups.encode


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("run_id", "rank", "step", "kind", name="uq_event_run_rank_step_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    time: Mapped[float] = mapped_column(Float(precision=53))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RankState(Base):
    """Run-level state per (run, rank), updated with each ingested batch; /metrics reads it."""

    __tablename__ = "rank_state"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_step: Mapped[int] = mapped_column(BigInteger, default=0)
    last_step_time: Mapped[float] = mapped_column(Float(precision=53), default=0.0)  # epoch s
    steps_total: Mapped[int] = mapped_column(BigInteger, default=0)
    skipped_steps_total: Mapped[int] = mapped_column(BigInteger, default=0)
    clipped_steps_total: Mapped[int] = mapped_column(BigInteger, default=0)
    nonfinite_steps_total: Mapped[int] = mapped_column(BigInteger, default=0)  # any non-finite grad
    nonfinite_loss_total: Mapped[int] = mapped_column(BigInteger, default=0)
    loss_scale_backoffs_total: Mapped[int] = mapped_column(BigInteger, default=0)
    loss_scale_growths_total: Mapped[int] = mapped_column(BigInteger, default=0)
    # Classic histogram of global_grad_norm: non-cumulative counts per GRAD_NORM_BUCKETS
    # bound plus a final +Inf (and NaN) bucket, and the sum of finite observations.
    grad_norm_bucket_counts: Mapped[list[Any]] = mapped_column(JSON, default=list)
    grad_norm_sum: Mapped[float] = mapped_column(Float(precision=53), default=0.0)
    # Last values (of the highest step seen).
    loss: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    loss_scale: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    global_grad_norm: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    max_layer_grad_norm: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    layers_nonfinite: Mapped[int] = mapped_column(Integer, default=0)
    headroom_bits: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    lr: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # Share of gradient elements per format-count outcome at the last step that had them.
    zero_ratio: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    underflow_ratio: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    subnormal_ratio: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    overflow_ratio: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    # Sampled: mean over tensors at the last sampled step.
    stale_fraction: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    update_ratio: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    # Sampled, Adam family: mean over tensors at the last sampled step.
    adam_update_rms: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    adam_eps_dominated: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    # Lowest SQNR (dB, protocol-encoded floats) over tensors per scheme at the last quantization step.
    quant_sqnr_min: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The last step whose matmul operands were measured (numwatch.monitor.detectors.gemm_events):
    # {"step": n, "sqnr_min": {"<operand>:<scheme>": protocol-encoded dB}, "below": [tensor indices]}.
    gemm_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The last step whose forward was measured: largest max attention logit over its attention
    # calls, and the output logits' statistics.
    attention_logit_max: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    log_z_mean: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    log_z_max: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    output_logit_absmax: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    events_total: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # kind -> count
    # This rank's own health at its last step that carried it (its gradient before the reduction).
    local_grad_norm: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    local_nonfinite: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    compute_time: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    # Rolling spike score per signal: judged-value count and recent spike episodes (numwatch.monitor.detectors.spikes).
    spike_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RankInbox(Base):
    """One rank's health at one step, kept until the step is judged across ranks (numwatch.monitor.detectors.ranks)."""

    __tablename__ = "rank_inbox"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[float] = mapped_column(Float(precision=53))
    loss: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    local_grad_norm: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    local_nonfinite: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    compute_time: Mapped[float | None] = mapped_column(ExactFloat, nullable=True)
    checksum: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    nonfinite_tensors: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)


class RankJudge(Base):
    """A multi-rank run's cross-rank judging: the steps judged so far and the detectors' state between steps."""

    __tablename__ = "rank_judge"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    judged_through: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    events_total: Mapped[dict[str, dict[str, int]]] = mapped_column(JSON, default=dict)  # kind -> {rank: count}


class Conflict(Base):
    """A step received again with different content: the first stored version wins, this records the loser."""

    __tablename__ = "conflicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(BigInteger)
    batch_id: Mapped[str] = mapped_column(String(200), default="")
    received_at: Mapped[float] = mapped_column(Float(precision=53))
