"""Step blocks: every stored field and array comes back exactly; the reader finds steps in order
however the blocks' ranges interleave, against a brute-force list of the stored steps."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pytest
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.reads import overview
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store import db
from numwatch.monitor.store.models import Run, StepBlock

N, MODULES = 5, 3


def _step(number: int, rng: np.random.Generator) -> dict:
    """A step with some fields absent, non-finite floats, all-zero and missing arrays."""
    floats = {
        name: rng.choice([None, math.nan, math.inf, -math.inf, float(rng.normal())], p=[0.2, 0.1, 0.05, 0.05, 0.6])
        for name in step_blocks.FLOAT_FIELDS
    }
    tensors = {"grad_norm": rng.lognormal(-3, 1, N).astype(np.float32), "nan_count": np.zeros(N, np.int64)}
    if number % 3 == 0:
        tensors["zeros"] = rng.integers(0, 100, N).astype(np.int64)
        tensors["grad_norm"][number % N] = np.nan
    if number % 4 == 0:
        tensors["inf_count"] = rng.integers(0, 3, N).astype(np.int64)
    traced = number % 5 == 0
    return {
        "step": number,
        **floats,
        "scale_decision": ["growth", "backoff", None][number % 3],
        "skipped": number % 7 == 0,
        "clipped": number % 2 == 0,
        "lr": [protocol.encode_float(1e-3 * number)] if number % 6 else [],
        "scalars": {"tokens": float(number)} if number % 2 else {},
        "tensors": tensors,
        "activation_absmax": rng.random(MODULES).astype(np.float32).tobytes() if traced else None,
        "activation_nonfinite": np.arange(MODULES, dtype=np.int64).tobytes() if traced else None,
    }


def _same(got: dict, want: dict) -> None:
    for name in step_blocks.FLOAT_FIELDS:
        assert repr(got[name]) == repr(None if want[name] is None else float(want[name])), name
    for name in (
        "step",
        "scale_decision",
        "skipped",
        "clipped",
        "lr",
        "scalars",
        "activation_absmax",
        "activation_nonfinite",
    ):
        assert got[name] == want[name], name
    assert got["tensors"].keys() == want["tensors"].keys()
    for name, values in want["tensors"].items():
        assert got["tensors"][name].dtype == np.dtype(protocol.TENSOR_STATS[name])
        assert got["tensors"][name].tobytes() == values.tobytes(), name


def test_a_block_decodes_to_exactly_what_was_encoded() -> None:
    rng = np.random.default_rng(1)
    steps = [_step(number, rng) for number in range(1, 70)]
    block = step_blocks.encode(steps)
    assert (block["first_step"], block["last_step"], block["count"]) == (1, 69, 69)
    assert ",zeros," in block["names"] and ",loss," in block["names"] and ",update_ratio," not in block["names"]
    decoded = step_blocks.decode(block["header"], {column: block[column] for column in step_blocks.COLUMNS}, N, MODULES)
    for got, want in zip(decoded, steps, strict=True):
        _same(got, want)
        assert got["stats"] == [
            name
            for name in step_blocks.ARRAY_DTYPES
            if name in want["tensors"] or (name.startswith("activation_") and want[name])
        ]
    # Only the arrays asked for are inflated, from the column holding them; the scalars need neither column.
    assert step_blocks.needed(("zeros",)) == ["sampled"] and step_blocks.needed(("grad_norm", "zeros")) == [
        "arrays",
        "sampled",
    ]
    only = step_blocks.decode(block["header"], {"sampled": block["sampled"]}, N, MODULES, wanted=("zeros",))
    assert [sorted(step["tensors"]) for step in only] == [
        ["zeros"] if "zeros" in step["tensors"] else [] for step in steps
    ]
    scalars = step_blocks.decode(block["header"], {}, N, MODULES, wanted=())
    assert [step["loss"] for step in scalars] == [step["loss"] for step in decoded]


def test_blocks_stay_within_their_step_and_span_limits() -> None:
    rng = np.random.default_rng(2)
    numbers = [*range(1, 600), 600 + step_blocks.MAX_SPAN, 601 + 2 * step_blocks.MAX_SPAN]
    blocks = step_blocks.blocks_of([_step(number, rng) for number in numbers])
    assert [block["count"] for block in blocks] == [
        step_blocks.MAX_STEPS,
        step_blocks.MAX_STEPS,
        599 - 2 * step_blocks.MAX_STEPS,
        1,
        1,
    ]
    assert all(block["last_step"] - block["first_step"] < step_blocks.MAX_SPAN for block in blocks)


@pytest.fixture
def session(database_url: str):
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    with Session(engine) as session:
        now = datetime.now(timezone.utc)
        session.add(
            Run(
                id=1,
                name="r",
                project="p",
                format="fp16",
                tensors=[{}] * N,
                modules=[{}] * MODULES,
                status="running",
                started_at=now,
                created_at=now,
                last_seen_at=now,
            )
        )
        session.flush()
        yield session
    engine.dispose()


def test_the_reader_finds_steps_in_order_across_interleaved_blocks(session: Session) -> None:
    rng = np.random.default_rng(3)
    # Batches as a client's retries and late arrivals deliver them: blocks whose ranges interleave.
    batches = [
        [*range(1, 11), *range(20, 31)],
        list(range(11, 20)),
        [35, 40, 45],
        list(range(31, 35)),
        list(range(100, 400)),
        [36, 37, 900],
    ]
    stored = {}
    for numbers in batches:
        steps = [_step(number, rng) for number in numbers]
        step_blocks.store(session, 1, 0, steps)
        stored.update({step["step"]: step for step in steps})
    assert session.query(StepBlock).count() == 7  # the 300-step batch is two blocks
    order = sorted(stored)
    reader = step_blocks.Reader(session, 1, 0, N, MODULES)
    assert [step["step"] for step in reader.range(wanted=())] == order
    for low, high in [(1, 1), (5, 33), (10, 11), (19, 36), (36, 38), (41, 99), (300, 2000), (901, 950)]:
        got = list(reader.range(low, high))
        assert [step["step"] for step in got] == [n for n in order if low <= n <= high]
        for step in got:
            _same(step, stored[step["step"]])
        assert reader.extent(low, high) == (
            (min(n for n in order if low <= n <= high), max(n for n in order if low <= n <= high))
            if any(low <= n <= high for n in order)
            else None
        )
    for before in (1, 12, 31, 36, 38, 46, 150, 901, None):
        want = [n for n in order if before is None or n < before][::-1]
        assert [step["step"] for step in reader.before(before, wanted=())] == want
        for count in (1, 5, 12, 40, 1000):  # read in one query, or streamed where blocks interleave
            got = reader.last(before, count)
            assert [step["step"] for step in got] == want[:count][::-1]
            for step in got:
                _same(step, stored[step["step"]])
            scalars = reader.last(before, count, wanted=(), full=3)  # the latest 3 whole, the others' fields
            assert [step["step"] for step in scalars] == want[:count][::-1]
            for step in scalars[-3:]:
                _same(step, stored[step["step"]])
            for step in scalars:
                assert repr(step["loss"]) == repr(got[scalars.index(step)]["loss"])
    assert [step["step"] for step in reader.before(None, wanted=(), having=("zeros",)) if "zeros" in step["stats"]] == [
        n for n in order if n % 3 == 0
    ][::-1]
    assert reader.find(37)["step"] == 37 and reader.find(38) is None
    assert reader.extent() == (1, 900)
    assert step_blocks.Reader(session, 1, 1, N, MODULES).extent() is None
    assert step_blocks.run_last_step(session, 1) == 900


def test_replacing_a_stored_step_rewrites_its_block_only(session: Session) -> None:
    rng = np.random.default_rng(4)
    steps = [_step(number, rng) for number in range(1, 65)]
    step_blocks.store(session, 1, 0, steps[:32])
    step_blocks.store(session, 1, 0, steps[32:])
    changed = {**steps[40], "tensors": {**steps[40]["tensors"], "quant_sqnr_int8": np.full(N, 31.5, np.float32)}}
    reader = step_blocks.Reader(session, 1, 0, N, MODULES)
    reader.replace({41: changed})
    for step in reader.range():
        _same(step, changed if step["step"] == 41 else steps[step["step"] - 1])


def test_the_live_tail_reads_the_steps_after_a_given_one_across_blocks(session: Session) -> None:
    rng = np.random.default_rng(5)
    steps = {number: _step(number, rng) for number in range(1, 31)}
    for numbers in ([*range(1, 11), *range(20, 31)], list(range(11, 20))):
        step_blocks.store(session, 1, 0, [steps[n] for n in numbers])
    run = session.get(Run, 1)
    tail = overview.tail(session, run, 0, 8, stale_after=300)
    assert tail["steps"] == list(range(9, 31)) and not tail["truncated"]
    assert tail["values"]["loss"] == [protocol.encode_float(steps[n]["loss"]) for n in range(9, 31)]
    assert tail["values"]["lr"] == [steps[n]["lr"][0] if steps[n]["lr"] else None for n in range(9, 31)]
