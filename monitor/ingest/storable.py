"""Text the database can store and the API can send back: every string valid Unicode, without NUL.

JSON's ``\\uXXXX`` escapes can spell a lone surrogate (``"\\udc80"``), which is no Unicode
character: it cannot be encoded as UTF-8, so a run holding one answers every later read with
a 500. PostgreSQL refuses NUL (U+0000) in text and in jsonb. Both are refused at the door
(422), on SQLite too, so a document is accepted or refused the same way on either database.
"""

from __future__ import annotations

from typing import Any


def _problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains NUL (U+0000), which the database cannot store"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate escape such as \\udc80)"
    return None


def find_unstorable_text(document: Any) -> str | None:
    """The first string (value or key) of a parsed JSON document that cannot be stored, described; None if all can."""
    pending = [document]
    while pending:  # iterative: a parsed document may be nested close to the recursion limit
        value = pending.pop()
        if isinstance(value, str):
            strings: list[str] = [value]
        elif isinstance(value, dict):
            strings = [key for key in value if isinstance(key, str)]
            pending.extend(value.values())
        elif isinstance(value, list):
            strings = []
            pending.extend(value)
        else:
            continue
        for text in strings:
            problem = _problem(text)
            if problem:
                return f"the string {ascii(text[:40])} {problem}"
    return None
