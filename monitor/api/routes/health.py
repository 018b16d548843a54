"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from numwatch.monitor.store.db import SchemaOutdated, check_schema

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database is reachable and its schema current")
def readyz(request: Request) -> JSONResponse:
    try:
        check_schema(request.app.state.engine)
    except SchemaOutdated as error:
        return JSONResponse({"status": "unavailable", "detail": str(error)}, status_code=503)
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        return JSONResponse({"status": "unavailable", "detail": f"database unreachable: {reason}"}, status_code=503)
    return JSONResponse({"status": "ready"})
