"""Every hook numwatch puts into a training loop runs through a :class:`Guard`: monitoring never breaks training.

A failure is counted, logged once per site (with its traceback) and reported to
``on_failure`` (the step ledger then drops the step under way whole); the hook returns None
and training goes on. Only the exception types in ``passthrough`` reach training: the
``NonFiniteError`` that ``on_nonfinite="raise"`` asks for.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

log = logging.getLogger("numwatch")

P = ParamSpec("P")
R = TypeVar("R")


class Guard:
    """Makes functions harmless to training; ``errors`` counts the failures it caught."""

    def __init__(self, on_failure: Callable[[], None], passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self.errors = 0
        self._on_failure = on_failure
        self._passthrough = passthrough
        self._failed_sites: set[str] = set()

    def __call__(self, site: str, function: Callable[P, R]) -> Callable[P, R | None]:
        """``function`` guarded: an exception (other than the pass-through ones) counts as a failure at ``site``."""

        def guarded(*args: P.args, **kwargs: P.kwargs) -> R | None:
            try:
                return function(*args, **kwargs)
            except self._passthrough:
                raise
            except Exception:
                self.failed(site)
                return None

        return guarded

    def failed(self, site: str) -> None:
        """Count a failure at ``site``; the first one there is logged with the exception being handled."""
        self.errors += 1
        self._on_failure()
        if site not in self._failed_sites:
            self._failed_sites.add(site)
            log.exception(
                "numwatch: monitoring failed in the %s (training continues; counted in monitoring_errors)", site
            )
