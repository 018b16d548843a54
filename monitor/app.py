"""The collector's FastAPI application, built by :func:`create_app` from :class:`Settings`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from numwatch.monitor.api import responses
from numwatch.monitor.api.ratelimit import RateLimiter
from numwatch.monitor.api.routes import health, metrics, pages, query, runs_write
from numwatch.monitor.api.security_headers import SecurityHeaders
from numwatch.monitor.errors import Refused
from numwatch.monitor.metrics.exposition import IngestMetrics, NumwatchCollector
from numwatch.monitor.settings import Settings
from numwatch.monitor.store import db
from numwatch.monitor.store.retention import Reaper
from numwatch.monitor.web import STATIC_DIR

log = logging.getLogger("numwatch.collector")


def prepare_database(settings: Settings) -> None:
    """Create and migrate an empty SQLite database (the embedded default); refuse an outdated schema."""
    engine = db.make_engine(settings.database_url)
    try:
        empty = not inspect(engine).get_table_names()
        if empty and engine.url.get_backend_name() == "sqlite":
            db.upgrade(settings.database_url)
            log.info("created the database at %s", engine.url.render_as_string(hide_password=True))
        db.check_schema(engine)
    finally:
        engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The collector app: storage, auth, write and read API, web pages, /metrics and health, per ``settings``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            log.warning("auth is off: anyone who can reach %s:%s can write and read runs", settings.host, settings.port)
        app.state.reaper.start()
        yield
        app.state.reaper.stop()
        if app.state.annotations is not None:
            app.state.annotations.close()
        app.state.engine.dispose()

    app = FastAPI(
        title="numwatch collector",
        version="1",
        description="Stores numeric-health statistics of PyTorch training runs, judges them, "
        "and exposes them to Prometheus.",
        lifespan=lifespan,
    )
    engine = db.make_engine(settings.database_url)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = db.make_session_factory(engine)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    retention = timedelta(days=settings.retention_days) if settings.retention_days > 0 else None
    app.state.reaper = Reaper(app.state.session_factory, retention, settings.retention_check_seconds)
    registry = CollectorRegistry()
    app.state.ingest_metrics = IngestMetrics(registry)
    registry.register(NumwatchCollector(app.state.session_factory, settings))
    app.state.metrics_registry = registry
    app.state.annotations = None
    if settings.grafana_url:
        from numwatch.monitor.metrics.annotations import AnnotationSink

        app.state.annotations = AnnotationSink(settings.grafana_url, settings.grafana_token)

    # One handler per family of errors: a refusal (Refused and its kinds), a database that is down.
    app.add_exception_handler(Refused, responses.refused)
    app.add_exception_handler(OperationalError, responses.database_unavailable)

    for router in (health.router, runs_write.router, query.router, metrics.router, pages.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(SecurityHeaders)
    return app
