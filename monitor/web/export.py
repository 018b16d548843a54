"""``numwatch export RUN -o run.html``: the run page as one self-contained file.

The page's scripts, styles and API answers are inlined; its own Content-Security-Policy
allows exactly those inline scripts and styles (by hash) and no network at all, so the
file opens offline and a hostile string in the data still cannot run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.reads import forward, overview, queries, ranks, readiness
from numwatch.monitor.store.auth import EVERYTHING
from numwatch.monitor.web import STATIC_DIR, page_html

# encodeURIComponent leaves these unescaped; quote() must too, or the keys would differ.
_URI_COMPONENT_SAFE = "!~*'()"
_ASSET = re.compile(
    r'<link rel="stylesheet" href="/static/([\w./-]+)">|<script src="/static/([\w./-]+)" defer></script>'
)


def request_key(path: str, params: dict[str, Any] | None = None) -> str:
    """The key the pages' ``NW.requestKey`` makes for a read: parameters sorted by name."""
    pairs = sorted((k, v) for k, v in (params or {}).items() if v is not None)
    query = "&".join(
        f"{quote(k, safe=_URI_COMPONENT_SAFE)}={quote(str(v), safe=_URI_COMPONENT_SAFE)}" for k, v in pairs
    )
    return f"{path}?{query}" if query else path


def run_page_responses(session: Session, name: str, stale_after: float, gemm_threshold: float) -> dict[str, Any]:
    """Every read the run page makes for run ``name``, keyed as the page asks for them."""
    run = queries.find_run(session, name, EVERYTHING)
    layout = json.loads((STATIC_DIR / "charts.json").read_text())
    detail = queries.run_detail(session, run, stale_after)
    base = protocol.run_path(name, safe=_URI_COMPONENT_SAFE)
    points, end = layout["max_points"], detail["last_step"]
    responses: dict[str, Any] = {
        "/static/charts.json": layout,
        base: detail,
        request_key(base + "/events"): queries.events(session, run, None),
        request_key(base + "/tensor-summary", {"max_points": points}): overview.tensor_summary(session, run, 0, points),
        request_key(base + "/forward", {"max_points": points}): forward.series(session, run, 0, None, None, points),
        request_key(base + "/quantization"): readiness.quantization_table(session, run, 0, "int4"),
        request_key(base + "/gemm"): readiness.gemm_table(session, run, 0, "fp8", gemm_threshold),
        request_key(base + "/heatmap", layout["gemm_heatmap"]): queries.heatmap(
            session, run, layout["gemm_heatmap"]["stat"], 0, layout["gemm_heatmap"]["max_steps"]
        ).cells(),
        request_key(base + "/heatmap", layout["heatmap"]): queries.heatmap(
            session, run, layout["heatmap"]["stat"], 0, layout["heatmap"]["max_steps"]
        ).cells(),
    }
    for chart in layout["series_charts"]:
        for series in chart["series"]:
            params = {"metric": series["metric"], "max_points": points, "end": end}
            responses[request_key(base + "/series", params)] = queries.series(
                session, run, series["metric"], None, 0, None, end, points
            )
    if run.world_size > 1:
        params = {"max_steps": layout["heatmap"]["max_steps"], "max_points": points}
        responses[request_key(base + "/ranks", params)] = ranks.rank_view(session, run, params["max_steps"], points)
    choice = overview.histogram_steps(session, run, "grad", 0)
    responses[request_key(base + "/histogram-steps", {"kind": "grad"})] = choice
    if choice["suggested"]:
        tensor, step = choice["suggested"]["tensor"], choice["suggested"]["step"]
        responses[request_key(base + "/histograms", {"tensor": tensor, "step": step, "kind": "grad"})] = (
            queries.histograms(session, run, tensor, "grad", 0, step)
        )
        responses[request_key(f"{base}/steps/{step}")] = queries.step_record(session, run, step, 0)
    return responses


def _script_text(text: str) -> str:
    # Inside <script>, only "</script" (any case) and "<!--" can end or confuse the element.
    return re.sub(r"<(/script|!--)", r"<\\\1", text, flags=re.IGNORECASE)


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def export_run_page(session: Session, name: str, stale_after: float, gemm_threshold: float) -> str:
    """The run page of ``name`` with its data, as one HTML document."""
    bundle = {"context": {"run": name}, "responses": run_page_responses(session, name, stale_after, gemm_threshold)}
    # JSON in a non-executed script element; "<" escaped so no string in it can close the element.
    data = json.dumps(bundle, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    scripts: list[str] = []
    styles: list[str] = []

    def inline(match: re.Match) -> str:
        css, js = match.groups()
        if css:
            styles.append((STATIC_DIR / css).read_text())
            return f"<style>{styles[-1]}</style>"
        scripts.append(_script_text((STATIC_DIR / js).read_text()))
        return f"<script>{scripts[-1]}</script>"

    page = page_html("run")
    page = re.sub(r'<link rel="icon"[^>]*>\n?', "", page)
    page = _ASSET.sub(inline, page)
    policy = (
        f"default-src 'none'; script-src {' '.join(map(_digest, scripts))}; style-src "
        f"{' '.join(map(_digest, styles))}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    page = page.replace(
        '<meta charset="utf-8">',
        f'<meta charset="utf-8">\n<meta http-equiv="Content-Security-Policy" content="{policy}">',
        1,
    )
    return page.replace("</body>", f'<script type="application/json" id="numwatch-data">{data}</script>\n</body>', 1)
