"""The built-in web view: static pages (plain HTML, CSS and JavaScript) and the vendored chart library.

The pages hold no data: their scripts read the same JSON read API as every other client,
so a page shows exactly what the API answers, under the same auth.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from pathlib import Path

STATIC_DIR = Path(str(files("numwatch.monitor.web") / "static"))
# Each page: the shell (page.html, with the chart library and the shared scripts) plus its own scripts.
PAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    "runs": ("runs.js",),
    "run": ("runview.js", "run.js"),
    "step": ("runview.js", "step.js"),
    "compare": ("compare.js",),
}


@cache
def page_html(name: str) -> str:
    scripts = "".join(f'<script src="/static/{script}" defer></script>\n' for script in PAGE_SCRIPTS[name])
    return (STATIC_DIR / "page.html").read_text().replace("<!-- page scripts -->\n", scripts, 1)
