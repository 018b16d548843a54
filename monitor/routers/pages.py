"""The web view's pages: static HTML shells whose scripts read the JSON API (no data is served here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from numwatch.monitor.schemas import MAX_STEP
from numwatch.monitor.web import STATIC_DIR

router = APIRouter(tags=["pages"], include_in_schema=False)


def _page(name: str) -> FileResponse:
    # no-cache: a page is revalidated, so an upgraded collector never runs an old script.
    return FileResponse(STATIC_DIR / name, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/")
def runs_page() -> FileResponse:
    return _page("runs.html")


@router.get("/runs/{run}")
def run_page(run: str) -> FileResponse:
    return _page("run.html")


@router.get("/runs/{run}/steps/{step}")
def step_page(run: str, step: Annotated[int, Path(ge=0, le=MAX_STEP)]) -> FileResponse:
    return _page("step.html")


@router.get("/compare")
def compare_page() -> FileResponse:
    return _page("compare.html")
