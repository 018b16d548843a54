"""Read API: runs, series, steps, histograms, events and a per-layer heatmap (flat JSON for Grafana)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from numwatch import protocol
from numwatch.monitor.api.deps import ReaderDep, RunDep, SessionDep, SettingsDep
from numwatch.monitor.api.responses import AUTH_RESPONSES, error_responses
from numwatch.monitor.ingest.schemas import MAX_RANK, MAX_STEP
from numwatch.monitor.reads import forward, overview, queries, ranks, readiness
from numwatch.monitor.reads.read_models import (
    ForwardSeries,
    GemmRecipe,
    GemmTable,
    HistogramSteps,
    QuantizationTable,
    Tail,
    TensorSummary,
)

router = APIRouter(prefix=protocol.RUNS_PATH, tags=["read"], responses=AUTH_RESPONSES)
RUN_RESPONSES = error_responses(404, 422)
# Bounded like the stored values (BIGINT): an unbounded integer reaching the database is a 500 there.
RankQuery = Annotated[int, Query(ge=0, le=MAX_RANK)]
StepQuery = Annotated[int | None, Query(ge=0, le=MAX_STEP)]


@router.get("", summary="Runs with status, last step and event counts by kind")
def list_runs(
    principal: ReaderDep,
    session: SessionDep,
    settings: SettingsDep,
) -> list[dict[str, Any]]:
    return [
        queries.run_summary(session, run, settings.stale_after_seconds)
        for run in queries.visible_runs(session, principal)
    ]


@router.get("/{run}", responses=RUN_RESPONSES, summary="A run's config, tensor schema, status and ranks")
def get_run(
    run: RunDep,
    session: SessionDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    return queries.run_detail(session, run, settings.stale_after_seconds)


@router.get("/{run}/series", responses=RUN_RESPONSES, summary="One metric over steps, downsampled keeping extremes")
def get_series(
    run: RunDep,
    session: SessionDep,
    metric: str = Query(
        ...,
        description="a per-step scalar (loss, global_grad_norm, loss_scale, headroom_bits, step_time, lr...) "
        "or a per-tensor stat (grad_norm, underflow...)",
    ),
    tensor: str | None = Query(None, description="tensor name, for per-tensor stats"),
    rank: RankQuery = 0,
    start: StepQuery = None,
    end: StepQuery = None,
    max_points: int = Query(
        1000,
        ge=3,
        le=100_000,
        description="at most this many points: every point when the window holds no more, "
        "else 3 per bucket of steps (min, max, first NaN)",
    ),
) -> dict[str, Any]:
    return queries.series(session, run, metric, tensor, rank, start, end, max_points)


@router.get(
    "/{run}/steps/{step}",
    responses=RUN_RESPONSES,
    summary="Everything recorded for one step: per-tensor stats by tensor name, forward-pass stats, events",
)
def get_step(
    run: RunDep,
    session: SessionDep,
    step: Annotated[int, Path(ge=0, le=MAX_STEP)],
    rank: RankQuery = 0,
) -> dict[str, Any]:
    return queries.step_record(session, run, step, rank)


@router.get(
    "/{run}/histograms", responses=RUN_RESPONSES, summary="Exponent (binade) and linear histogram of one tensor"
)
def get_histograms(
    run: RunDep,
    session: SessionDep,
    tensor: str,
    kind: protocol.HistogramKind = "grad",
    rank: RankQuery = 0,
    step: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="default: the latest sampled step")] = None,
) -> dict[str, Any]:
    return queries.histograms(session, run, tensor, kind, rank, step)


@router.get(
    "/{run}/events",
    responses=RUN_RESPONSES,
    summary="Events (detector and client), with time_ms for Grafana annotations",
)
def get_events(
    run: RunDep,
    session: SessionDep,
    kind: str | None = None,
) -> list[dict[str, Any]]:
    return queries.events(session, run, kind)


@router.get(
    "/{run}/heatmap",
    response_model=list[dict[str, Any]],
    responses=RUN_RESPONSES,
    summary="Flat [{step, tensor, value}] of a per-tensor stat over the run or a window",
)
def get_heatmap(
    run: RunDep,
    session: SessionDep,
    stat: str = "grad_norm",
    rank: RankQuery = 0,
    start: StepQuery = None,
    end: StepQuery = None,
    max_steps: int = Query(
        100,
        ge=1,
        le=10_000,
        description="columns: every step having the stat when no more do, "
        "else buckets of steps (each cell the bucket's maximum, NaN if it holds one)",
    ),
) -> Response:
    # Rendered here: validating and encoding tens of thousands of cell dicts took ten times the query.
    return Response(
        queries.heatmap(session, run, stat, rank, max_steps, start, end).cells_json(),
        media_type="application/json",
    )


@router.get(
    "/{run}/ranks",
    responses=RUN_RESPONSES,
    summary="Each rank's own health: local gradient norm per rank and step (heatmap cells), compute time per rank, "
    "latest values sorted by deviation from the ranks' median, missing ranks, cross-rank events",
)
def get_ranks(
    run: RunDep,
    session: SessionDep,
    max_steps: int = Query(300, ge=2, le=10_000, description="heatmap columns at most (buckets keep the largest)"),
    max_points: int = Query(1000, ge=2, le=100_000, description="compute-time points per rank at most"),
    start: StepQuery = None,
    end: StepQuery = None,
) -> dict[str, Any]:
    return ranks.rank_view(session, run, max_steps, max_points, start, end)


@router.get(
    "/{run}/tensor-summary",
    responses=RUN_RESPONSES,
    response_model=TensorSummary,
    summary="Whole-model shares of zero/underflow/subnormal/overflow gradient elements "
    "and mean update ratio, stale fraction, per step",
)
def get_tensor_summary(
    run: RunDep,
    session: SessionDep,
    rank: RankQuery = 0,
    max_points: int = Query(1000, ge=2, le=100_000),
) -> dict[str, Any]:
    return overview.tensor_summary(session, run, rank, max_points)


@router.get(
    "/{run}/quantization",
    responses=RUN_RESPONSES,
    response_model=QuantizationTable,
    summary="Per weight tensor, the SQNR of int8/int4/NF4/fp8 quantization at the last measured step, worst first",
)
def get_quantization(
    run: RunDep,
    session: SessionDep,
    rank: RankQuery = 0,
    sort: protocol.QuantScheme = "int4",
) -> dict[str, Any]:
    return readiness.quantization_table(session, run, rank, sort)


@router.get(
    "/{run}/gemm",
    responses=RUN_RESPONSES,
    response_model=GemmTable,
    summary="Per Linear, what fp8/MXFP8/NVFP4 would do to its matmul operands X, W, dY at the last measured step, "
    "worst first (the layers to keep in bf16)",
)
def get_gemm(
    run: RunDep,
    session: SessionDep,
    settings: SettingsDep,
    rank: RankQuery = 0,
    recipe: GemmRecipe = "fp8",
) -> dict[str, Any]:
    return readiness.gemm_table(session, run, rank, recipe, settings.detect.gemm_sqnr_threshold)


@router.get(
    "/{run}/forward",
    responses=RUN_RESPONSES,
    response_model=ForwardSeries,
    summary="Max attention logit per attention call, the run's maximum, and output-logit log Z over the measured steps",
)
def get_forward(
    run: RunDep,
    session: SessionDep,
    rank: RankQuery = 0,
    start: StepQuery = None,
    end: StepQuery = None,
    max_points: int = Query(1000, ge=2, le=100_000),
) -> dict[str, Any]:
    return forward.series(session, run, rank, start, end, max_points)


@router.get(
    "/{run}/histogram-steps",
    responses=RUN_RESPONSES,
    response_model=HistogramSteps,
    summary="The sampled steps that have histograms",
)
def get_histogram_steps(
    run: RunDep,
    session: SessionDep,
    kind: protocol.HistogramKind = "grad",
    rank: RankQuery = 0,
) -> dict[str, Any]:
    return overview.histogram_steps(session, run, kind, rank)


@router.get(
    "/{run}/tail",
    responses=RUN_RESPONSES,
    response_model=Tail,
    summary="Per-step scalars and events after a step (what a live page polls)",
)
def get_tail(
    run: RunDep,
    session: SessionDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=MAX_STEP)] = 0,
    rank: RankQuery = 0,
) -> dict[str, Any]:
    return overview.tail(session, run, rank, after, settings.stale_after_seconds)
