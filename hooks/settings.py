"""The training side's environment variables, named and read in one place (standard library only).

Each one is a default that an argument of :func:`numwatch.watch` (or a ``numwatch`` command's
flag) overrides. A variable set to the empty string counts as unset.
"""

from __future__ import annotations

import os

RUN = "NUMWATCH_RUN"  # the run name
PROJECT = "NUMWATCH_PROJECT"  # the project a new run is registered in
URL = "NUMWATCH_URL"  # the collector's base URL; unset: the documents go to the spool
TOKEN = "NUMWATCH_TOKEN"  # the collector's bearer token
SPOOL_DIR = "NUMWATCH_SPOOL_DIR"  # the spool root


def read(name: str) -> str | None:
    """The value of the environment variable ``name``; None when it is unset or empty."""
    return os.environ.get(name) or None
