"""The web view's pages: one static HTML shell plus each page's scripts, which read the JSON API
(no data is served here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import HTMLResponse

from numwatch.monitor.ingest.schemas import MAX_STEP
from numwatch.monitor.web import page_html

router = APIRouter(tags=["pages"], include_in_schema=False)
# no-cache: a page is revalidated, so an upgraded collector never runs an old script.
HEADERS = {"Cache-Control": "no-cache"}


def _page(name: str) -> HTMLResponse:
    return HTMLResponse(page_html(name), headers=HEADERS)


@router.get("/")
def runs_page() -> HTMLResponse:
    return _page("runs")


@router.get("/runs/{run}")
def run_page(run: str) -> HTMLResponse:
    return _page("run")


@router.get("/runs/{run}/steps/{step}")
def step_page(run: str, step: Annotated[int, Path(ge=0, le=MAX_STEP)]) -> HTMLResponse:
    return _page("step")


@router.get("/compare")
def compare_page() -> HTMLResponse:
    return _page("compare")
