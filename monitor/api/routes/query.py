"""Read API: runs, series, steps, histograms, events and a per-layer heatmap (flat JSON for Grafana)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.api.deps import get_session, get_settings, require_reader
from numwatch.monitor.api.responses import AUTH_RESPONSES, error_responses
from numwatch.monitor.errors import Refused
from numwatch.monitor.ingest.schemas import MAX_RANK, MAX_STEP
from numwatch.monitor.reads import forward, overview, queries, readiness
from numwatch.monitor.reads.read_models import (
    ForwardSeries,
    GemmRecipe,
    GemmTable,
    HistogramSteps,
    QuantizationTable,
    Tail,
    TensorSummary,
)
from numwatch.monitor.settings import Settings
from numwatch.monitor.store.auth import Principal

router = APIRouter(prefix="/api/v1", tags=["read"], responses=AUTH_RESPONSES)
RUN_RESPONSES = error_responses(404, 422)
# Bounded like the stored values (BIGINT): an unbounded integer reaching the database is a 500 there.
RankQuery = Annotated[int, Query(ge=0, le=MAX_RANK)]
StepQuery = Annotated[int | None, Query(ge=0, le=MAX_STEP)]


def _answer(work: Any) -> Any:
    """``work()``, with a query's not-found turned into an HTTP 404 that says what exists."""
    try:
        return work()
    except Refused as error:
        raise HTTPException(error.status, error.message) from None


def _run(session: Session, name: str, principal: Principal) -> Any:
    return _answer(lambda: queries.find_run(session, name, principal))


@router.get("/runs", summary="Runs with status, last step and event counts by kind")
def list_runs(
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> list[dict]:
    return [
        queries.run_summary(session, run, settings.stale_after_seconds)
        for run in queries.visible_runs(session, principal)
    ]


@router.get("/runs/{run}", responses=RUN_RESPONSES, summary="A run's config, tensor schema, status and ranks")
def get_run(
    run: str,
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> dict:
    return queries.run_detail(session, _run(session, run, principal), settings.stale_after_seconds)


@router.get(
    "/runs/{run}/series", responses=RUN_RESPONSES, summary="One metric over steps, downsampled keeping extremes"
)
def get_series(
    run: str,
    metric: str = Query(
        ...,
        description="a per-step scalar (loss, global_grad_norm, loss_scale, headroom_bits, step_time, lr...) or a per-tensor stat (grad_norm, underflow...)",
    ),
    tensor: str | None = Query(None, description="tensor name, for per-tensor stats"),
    rank: RankQuery = 0,
    start: StepQuery = None,
    end: StepQuery = None,
    max_points: int = Query(
        1000,
        ge=3,
        le=100_000,
        description="at most this many points: every point when the window holds no more, else 3 per bucket of steps (min, max, first NaN)",
    ),
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    found = _run(session, run, principal)
    return _answer(lambda: queries.series(session, found, metric, tensor, rank, start, end, max_points))


@router.get(
    "/runs/{run}/steps/{step}",
    responses=RUN_RESPONSES,
    summary="Everything recorded for one step, per-tensor stats by tensor name",
)
def get_step(
    run: str,
    step: Annotated[int, Path(ge=0, le=MAX_STEP)],
    rank: RankQuery = 0,
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    found = _run(session, run, principal)
    return _answer(lambda: queries.step_record(session, found, step, rank))


@router.get(
    "/runs/{run}/histograms", responses=RUN_RESPONSES, summary="Exponent (binade) and linear histogram of one tensor"
)
def get_histograms(
    run: str,
    tensor: str,
    kind: protocol.HistogramKind = "grad",
    rank: RankQuery = 0,
    step: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="default: the latest sampled step")] = None,
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    found = _run(session, run, principal)
    return _answer(lambda: queries.histograms(session, found, tensor, kind, rank, step))


@router.get(
    "/runs/{run}/events",
    responses=RUN_RESPONSES,
    summary="Events (detector and client), with time_ms for Grafana annotations",
)
def get_events(
    run: str,
    kind: str | None = None,
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> list[dict]:
    return queries.events(session, _run(session, run, principal), kind)


@router.get(
    "/runs/{run}/heatmap",
    response_model=list[dict],
    responses=RUN_RESPONSES,
    summary="Flat [{step, tensor, value}] of a per-tensor stat over the run or a window",
)
def get_heatmap(
    run: str,
    stat: str = "grad_norm",
    rank: RankQuery = 0,
    start: StepQuery = None,
    end: StepQuery = None,
    max_steps: int = Query(
        100,
        ge=1,
        le=10_000,
        description="columns: every step having the stat when no more do, else buckets of steps (each cell the bucket's maximum, NaN if it holds one)",
    ),
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> Response:
    found = _run(session, run, principal)
    # Rendered here: validating and encoding tens of thousands of cell dicts took ten times the query.
    return Response(
        _answer(lambda: queries.heatmap(session, found, stat, rank, max_steps, start, end)).cells_json(),
        media_type="application/json",
    )


@router.get(
    "/runs/{run}/tensor-summary",
    responses=RUN_RESPONSES,
    response_model=TensorSummary,
    summary="Whole-model shares of zero/underflow/subnormal/overflow gradient elements and mean update ratio, stale fraction, per step",
)
def get_tensor_summary(
    run: str,
    rank: RankQuery = 0,
    max_points: int = Query(1000, ge=2, le=100_000),
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    return overview.tensor_summary(session, _run(session, run, principal), rank, max_points)


@router.get(
    "/runs/{run}/quantization",
    responses=RUN_RESPONSES,
    response_model=QuantizationTable,
    summary="Per weight tensor, the SQNR of int8/int4/NF4/fp8 quantization at the last measured step, worst first",
)
def get_quantization(
    run: str,
    rank: RankQuery = 0,
    sort: protocol.QuantScheme = "int4",
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    return readiness.quantization_table(session, _run(session, run, principal), rank, sort)


@router.get(
    "/runs/{run}/gemm",
    responses=RUN_RESPONSES,
    response_model=GemmTable,
    summary="Per Linear, what fp8/MXFP8/NVFP4 would do to its matmul operands X, W, dY at the last measured step, "
    "worst first (the layers to keep in bf16)",
)
def get_gemm(
    run: str,
    rank: RankQuery = 0,
    recipe: GemmRecipe = "fp8",
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> dict:
    threshold = settings.detect.gemm_sqnr_threshold
    return readiness.gemm_table(session, _run(session, run, principal), rank, recipe, threshold)


@router.get(
    "/runs/{run}/forward",
    responses=RUN_RESPONSES,
    response_model=ForwardSeries,
    summary="Max attention logit per attention call, the run's maximum, and output-logit log Z over the measured steps",
)
def get_forward(
    run: str,
    rank: RankQuery = 0,
    start: StepQuery = None,
    end: StepQuery = None,
    max_points: int = Query(1000, ge=2, le=100_000),
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    return forward.series(session, _run(session, run, principal), rank, start, end, max_points)


@router.get(
    "/runs/{run}/histogram-steps",
    responses=RUN_RESPONSES,
    response_model=HistogramSteps,
    summary="The sampled steps that have histograms",
)
def get_histogram_steps(
    run: str,
    kind: protocol.HistogramKind = "grad",
    rank: RankQuery = 0,
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
) -> dict:
    return overview.histogram_steps(session, _run(session, run, principal), kind, rank)


@router.get(
    "/runs/{run}/tail",
    responses=RUN_RESPONSES,
    response_model=Tail,
    summary="Per-step scalars and events after a step (what a live page polls)",
)
def get_tail(
    run: str,
    after: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    rank: RankQuery = 0,
    principal: Principal = Depends(require_reader),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> dict:
    return overview.tail(session, _run(session, run, principal), rank, after, settings.stale_after_seconds)
