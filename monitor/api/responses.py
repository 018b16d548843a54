"""The collector's refusals as its OpenAPI schema documents them: every one is ``{"detail": ...}``.

Documenting them lets clients (and schema-driven tests) tell a refusal the API promises from
an accident: an undocumented status code is a bug in the code or in this table.
"""

from __future__ import annotations

from typing import Any

from numwatch.monitor.ingest.schemas import ErrorDetail

_DESCRIPTIONS = {
    401: "missing, invalid or revoked bearer token",
    403: "the token's project may not write this run",
    404: "unknown run (runs of other projects count as unknown), step, tensor, metric or histogram",
    409: "the run exists with a different tensor schema or project, or the rank is not registered",
    413: "body over the size limit: send smaller batches",
    415: "body not sent as application/json",
    422: "invalid document or parameter, naming the field",
    429: "request rate limit of this token exceeded; see Retry-After",
    503: "database unavailable; nothing was stored, retry later",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each status with its meaning and the error body."""
    return {status: {"model": ErrorDetail, "description": _DESCRIPTIONS[status]} for status in statuses}


# What any endpoint behind require_reader / require_writer may answer before it runs.
AUTH_RESPONSES = error_responses(401, 429, 503)
