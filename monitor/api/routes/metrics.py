"""GET /metrics in the Prometheus text format (prometheus_client renders it)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus exposition of run state and ingest metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    # A thread of its own rather than a token of the shared pool, which a busy collector's batches hold.
    body = await anyio.to_thread.run_sync(
        generate_latest, request.app.state.metrics_registry, limiter=anyio.CapacityLimiter(1)
    )
    return Response(body, media_type=CONTENT_TYPE_LATEST)
