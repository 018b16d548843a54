"""The collector's refusals: the answers of its exception handlers, and the table its OpenAPI
schema documents them with. Every one is ``{"detail": ...}``.

Documenting them lets clients (and schema-driven tests) tell a refusal the API promises from
an accident: an undocumented status code is a bug in the code or in this table.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from numwatch.monitor.errors import Refused
from numwatch.monitor.ingest.schemas import ErrorDetail

DATABASE_UNAVAILABLE = "database unavailable; nothing was stored, retry later"

_DESCRIPTIONS = {
    401: "missing, invalid or revoked bearer token",
    403: "the token's project may not write this run",
    404: "unknown run (runs of other projects count as unknown), step, tensor, metric or histogram",
    409: "the run exists with a different tensor schema or project, or the rank is not registered",
    413: "body over the size limit: send smaller batches",
    415: "body not sent as application/json",
    422: "invalid document or parameter, naming the field",
    429: "request rate limit of this token exceeded; see Retry-After",
    503: DATABASE_UNAVAILABLE,
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each status with its meaning and the error body."""
    return {status: {"model": ErrorDetail, "description": _DESCRIPTIONS[status]} for status in statuses}


# What any endpoint behind require_reader / require_writer may answer before it runs.
AUTH_RESPONSES = error_responses(401, 429, 503)


async def refused(request: Request, error: Exception) -> JSONResponse:
    """A :class:`Refused` raised by the store or a read, as its HTTP status and message."""
    assert isinstance(error, Refused)  # registered for Refused only; narrows the type Starlette's signature widens
    return JSONResponse({"detail": error.message}, status_code=error.status)


async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
    """The database did not answer (down, restarting, unreachable): the client retries later."""
    return JSONResponse({"detail": DATABASE_UNAVAILABLE}, status_code=503)
