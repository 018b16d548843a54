"""A headless Chromium driven by Selenium: the system's chromium and chromedriver (Debian
packages), a fresh profile per browser, and helpers to wait for a page and read its console."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.binaries import require_binary

HINT = "Debian: apt-get install chromium chromium-driver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
    "--force-device-scale-factor=1",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium; skips (fails in CI) without the binaries."""
    binary = require_binary("chromium", HINT)
    driver_path = require_binary("chromedriver", HINT)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="numwatch-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver: Any, url: str, timeout: float = 20.0) -> None:
    """Load ``url`` and wait until its script marks it ready (or shows an error or the token prompt)."""
    driver.get(url)
    wait_for(
        driver,
        "return document.body.dataset.ready === 'true' || !!document.getElementById('page-error') || "
        "!!document.getElementById('token-form')",
        timeout,
    )


def wait_for(driver: Any, script: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for: {script}"
            return value
        time.sleep(0.05)


# Chromium's hint after repeated getImageData on one canvas: caused by the tests' own pixel
# reads (the pages never read pixels back), so not a page error.
READBACK_HINT = "willReadFrequently"


def console_errors(driver: Any) -> list[str]:
    """The console's errors and warnings since the last call (the log is drained by reading)."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] in ("SEVERE", "WARNING") and READBACK_HINT not in entry["message"]
    ]


def heatmap_pixel(driver: Any, tensor: str, step: int) -> list[int]:
    """RGB of the heatmap's cell (tensor, step), read from the canvas."""
    return driver.execute_script(
        "const h = Charts.registry.heatmap, p = h.layout.cellCenter(arguments[0], arguments[1]);"
        "return Array.from(h.canvas.getContext('2d').getImageData(Math.round(p.x * h.layout.px), Math.round(p.y * "
        "h.layout.px), 1, 1).data).slice(0, 3);",
        tensor,
        step,
    )


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
