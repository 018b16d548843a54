"""FastAPI dependencies: settings, a database session per request, and auth."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from numwatch.monitor.api.ratelimit import retry_after_header
from numwatch.monitor.settings import Settings
from numwatch.monitor.store.auth import EVERYTHING, Principal, authenticate

bearer = HTTPBearer(auto_error=False, description="a token from `numwatch token create --project P`")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings  # set by the app factory
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def _principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None, session: Session, required: bool
) -> Principal:
    if not required:
        return EVERYTHING
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: send `Authorization: Bearer <token>` (create one with `numwatch token create "
            "--project P`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        principal = authenticate(session, credentials.credentials)
    except OperationalError as error:
        raise HTTPException(503, "database unavailable, retry later") from error
    if principal is None:
        # Never echo the token: it may be a real one with a typo.
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    wait = request.app.state.rate_limiter.acquire(principal.token_id)
    if wait > 0:
        raise HTTPException(429, "request rate limit of this token exceeded", headers=retry_after_header(wait))
    return principal


def require_writer(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> Principal:
    """The caller of a write endpoint: a valid token unless auth is off."""
    return _principal(request, credentials, session, settings.auth_enabled)


def require_reader(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings),
) -> Principal:
    """The caller of a read endpoint: a valid token unless auth is off or reads are open."""
    return _principal(request, credentials, session, settings.auth_enabled and not settings.open_reads)
