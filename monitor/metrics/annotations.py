"""Detector and client events posted to Grafana as annotations, from a background thread.

The design card names ``grafana-api``; that package is unmaintained ("not supported
anymore", last release 2020). ``grafana-client`` is its maintained fork with the same
API (``GrafanaApi.from_url``, ``annotations.add_annotation``), and is what numwatch uses.
It is imported lazily: the collector runs without Grafana.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

logger = logging.getLogger(__name__)


def grafana_api(url: str, token: str | None, timeout: float) -> Any:
    """A ``grafana_client.GrafanaApi`` for ``url``, authenticated with a bearer ``token``."""
    from grafana_client.api import GrafanaApi  # lazy: only Grafana users need grafana-client

    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def annotation_for(event: dict[str, Any], run: str) -> dict[str, Any]:
    """``add_annotation`` arguments for a collector event ({"step","rank","kind","details","time"[, "time_ms"]})."""
    time_ms = event.get("time_ms")
    if time_ms is None:
        time_ms = round(float(event["time"]) * 1000)
    details = event.get("details") or {}
    text = f"{event['kind']} at step {event['step']} (rank {event.get('rank', 0)})"
    if details:
        text += f": {json.dumps(details, sort_keys=True, default=str)}"
    return {"time_from": int(time_ms), "time_to": int(time_ms), "tags": ["numwatch", event["kind"], run], "text": text}


class AnnotationSink:
    """Posts events to Grafana as annotations from a background thread.

    :meth:`post` never blocks: it puts the event on a bounded queue and returns False
    (counted in ``dropped``) when the queue is full. Failed posts are counted in
    ``failed`` and not retried, so a down Grafana costs the collector nothing.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        max_queue: int = 1000,
        timeout: float = 5.0,
        dashboard_uid: str | None = None,
    ) -> None:
        self._url = url
        self._token = token
        self._timeout = timeout
        self._dashboard_uid = dashboard_uid
        self._queue: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        # Each counter has one writer: the worker (posted, failed) or the caller (dropped).
        self.posted = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._work, name="numwatch-annotations", daemon=True)
        self._thread.start()

    def post(self, event: dict[str, Any], run: str) -> bool:
        """Queue ``event`` of ``run`` for posting; False when it was dropped (queue full or closed)."""
        if self._stop.is_set():
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait((event, run))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Post what is queued (within ``timeout`` seconds), then stop the worker."""
        self._stop.set()
        self._thread.join(timeout)

    def _work(self) -> None:
        api = None
        while True:
            try:
                event, run = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                api = api or grafana_api(self._url, self._token, self._timeout)
                api.annotations.add_annotation(dashboard_uid=self._dashboard_uid, **annotation_for(event, run))
                self.posted += 1
            except Exception as error:  # any failure (network, 4xx, 5xx) only counts
                self.failed += 1
                logger.debug("annotation post to %s failed: %s", self._url, error)
