"""The built-in web view: static pages (plain HTML, CSS and JavaScript) and the vendored chart library.

The pages hold no data: their scripts read the same JSON read API as every other client,
so a page shows exactly what the API answers, under the same auth.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

STATIC_DIR = Path(str(files("numwatch.monitor.web") / "static"))
