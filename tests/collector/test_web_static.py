"""The web view's static files, read as shipped: the vendored chart library is the pinned release
with its licence, and the pages can carry no inline or third-party script."""

from __future__ import annotations

import hashlib
import json
import re

from numwatch import protocol
from numwatch.monitor.web import PAGE_SCRIPTS, STATIC_DIR, page_html

VENDOR = STATIC_DIR / "vendor"


def test_vendored_uplot_is_the_pinned_release_with_its_licence() -> None:
    manifest = json.loads((VENDOR / "vendor.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert (
        (VENDOR / "uPlot.iife.min.js")
        .read_text()
        .startswith(f"/*! https://github.com/leeoniya/uPlot (v{manifest['version']}) */")
    )
    licence = (VENDOR / "uPlot.LICENSE").read_text()
    assert "The MIT License" in licence and "Leon Sorokin" in licence


def test_pages_load_only_their_own_scripts_and_styles() -> None:
    for page in PAGE_SCRIPTS:
        html = page_html(page)
        scripts = re.findall(r"<script\b[^>]*>", html)
        assert scripts and all(re.fullmatch(r'<script src="/static/[\w./-]+\.js" defer>', tag) for tag in scripts), page
        assert not re.search(r"<script[^>]*>[^<]", html), page  # no inline script body
        assert not re.search(r"\son\w+=|\sstyle=|https?://", html), page
        for asset in re.findall(r'(?:src|href)="/static/([\w./-]+)"', html):
            assert (STATIC_DIR / asset).is_file(), (page, asset)


def test_our_scripts_never_parse_strings_as_html() -> None:
    for script in STATIC_DIR.glob("*.js"):
        text = script.read_text()
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            'setAttribute("on',
        ):
            assert sink not in text, (script.name, sink)


def test_the_runs_path_is_spelled_once_in_the_scripts() -> None:
    """The pages read the API under the protocol's RUNS_PATH, declared once in common.js."""
    declaration = f'const RUNS_PATH = "{protocol.RUNS_PATH}";'
    assert declaration in (STATIC_DIR / "common.js").read_text()
    for script in STATIC_DIR.glob("*.js"):
        assert script.read_text().count(protocol.RUNS_PATH) == (script.name == "common.js"), script.name
