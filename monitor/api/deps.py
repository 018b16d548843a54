"""FastAPI dependencies, as ``Annotated`` aliases the routers take as parameters: settings, a
database session per request, the caller (auth and rate limit) and the run a path names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from numwatch.monitor.api.ratelimit import retry_after_header
from numwatch.monitor.reads.queries import find_run
from numwatch.monitor.settings import Settings
from numwatch.monitor.store.auth import EVERYTHING, Principal, authenticate
from numwatch.monitor.store.models import Run

bearer = HTTPBearer(auto_error=False, description="a token from `numwatch token create --project P`")


# The dependencies that do no I/O are ``async``: FastAPI runs a plain function in the thread pool, and
# under load each such hop (a queue, a thread wake-up, a wake-up of the event loop) costs more than the work.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings  # set by the app factory
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request; closed in the thread pool only when it still holds a connection (a
    read left its transaction open: closing rolls it back), else here (no I/O)."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
# One session per request: FastAPI caches a dependency within a request, so the caller's
# lookup, the run's and the route's work share it.
SessionDep = Annotated[Session, Depends(get_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None, session: Session, required: bool
) -> Principal:
    if not required:
        return EVERYTHING
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: send `Authorization: Bearer <token>` "
            "(create one with `numwatch token create --project P`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = authenticate(session, credentials.credentials)
    if principal is None:
        # Never echo the token: it may be a real one with a typo.
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    wait = request.app.state.rate_limiter.acquire(principal.token_id)
    if wait > 0:
        raise HTTPException(429, "request rate limit of this token exceeded", headers=retry_after_header(wait))
    return principal


async def _caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None, session: Session, required: bool
) -> Principal:
    """:func:`_principal`, in the thread pool when it looks the token up."""
    if not required:
        return EVERYTHING
    return await run_in_threadpool(_principal, request, credentials, session, required)


async def require_writer(
    request: Request, credentials: Credentials, session: SessionDep, settings: SettingsDep
) -> Principal:
    """The caller of a write endpoint: a valid token unless auth is off."""
    return await _caller(request, credentials, session, settings.auth_enabled)


async def require_reader(
    request: Request, credentials: Credentials, session: SessionDep, settings: SettingsDep
) -> Principal:
    """The caller of a read endpoint: a valid token unless auth is off or reads are open."""
    return await _caller(request, credentials, session, settings.auth_enabled and not settings.open_reads)


WriterDep = Annotated[Principal, Depends(require_writer)]
ReaderDep = Annotated[Principal, Depends(require_reader)]


def readable_run(run: str, session: SessionDep, principal: ReaderDep) -> Run:
    """The run the path's ``{run}`` names, if this reader may see it (else ``NotFound``, a 404)."""
    return find_run(session, run, principal)


RunDep = Annotated[Run, Depends(readable_run)]
