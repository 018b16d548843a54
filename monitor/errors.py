"""Requests the collector refuses, as exceptions that carry their HTTP status.

The store and read model raise them; the routers turn them into the HTTP answer. A write
refusal and a read miss are siblings, so catching one never catches the other.
"""

from __future__ import annotations


class Refused(Exception):
    """A request the collector refuses; ``status`` is the HTTP status, the message names the field or object."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class IngestError(Refused):
    """A run or batch the store refuses to write (403, 409, 422)."""


class NotFound(Refused):
    """What a request names does not exist, or not for this caller (404)."""

    def __init__(self, message: str) -> None:
        super().__init__(404, message)
