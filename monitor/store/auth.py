"""Bearer tokens: ``nw_<random>``, stored as sha256, scoped to one project, revocable."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from numwatch.monitor.store.models import Token

TOKEN_PREFIX = "nw_"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: ``project`` None means every project (auth off)."""

    project: str | None
    token_id: int | None = None

    def may_access(self, project: str) -> bool:
        return self.project is None or hmac.compare_digest(self.project.encode(), project.encode())


EVERYTHING = Principal(project=None)  # auth off, and local tools (reports) reading the database directly


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, project: str, name: str = "") -> str:
    """A new token for ``project``; only its hash is stored, so this is the one chance to see it."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(Token(project=project, name=name, token_hash=hash_token(token), created_at=datetime.now(timezone.utc)))
    session.flush()
    return token


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal of a valid, unrevoked ``token``; None otherwise.

    The lookup is by the sha256 of the token (an index probe leaks nothing about the
    token itself); the stored hash is then compared in constant time.
    """
    presented = hash_token(token)
    row = session.execute(select(Token).where(Token.token_hash == presented)).scalar_one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.token_hash, presented):
        return None
    return Principal(project=row.project, token_id=row.id)


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke token ``token_id``; False when there is no such active token."""
    row = session.get(Token, token_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(timezone.utc)
    return True


def list_tokens(session: Session) -> list[Token]:
    return list(session.execute(select(Token).order_by(Token.id)).scalars())
