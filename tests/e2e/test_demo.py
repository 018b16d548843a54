"""`numwatch demo --exit` end to end, shortened: a real collector detects the instability it provokes,
in order, and the run page it prints tells that story in a real browser."""

from __future__ import annotations

import contextlib
import io
import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from numwatch.monitor.ops import stack
from numwatch.monitor.ops.cli import main
from numwatch.monitor.ops.demo import DemoPlan
from tests.support import browser

STEPS = 90
# Training the demo dominates (about a minute alone on two cores; several on a shared machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass
class Demo:
    output: str
    url: str
    page: str
    events: list[dict]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    with stack.running_collector(tmp_path_factory.mktemp("demo")) as url:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["demo", "--exit", "--steps", str(STEPS), "--url", url]) == 0
        page = re.search(r"run page: (\S+)", out.getvalue()).group(1)
        run = page.rsplit("/", 1)[1]
        with urllib.request.urlopen(f"{url}/api/v1/runs/{run}/events", timeout=10) as response:
            yield Demo(out.getvalue(), url, page, json.loads(response.read()))


def first_steps(events: list[dict]) -> dict[str, int]:
    first: dict[str, int] = {}
    for event in sorted(events, key=lambda e: e["step"]):
        first.setdefault(event["kind"], event["step"])
    return first


def test_demo_detects_explosion_before_nan_and_names_the_origin(demo: Demo) -> None:
    first = first_steps(demo.events)
    assert {"grad_explosion", "nonfinite_origin", "nonfinite_loss", "loss_scale_backoff", "skipped_step"} <= set(first)
    assert DemoPlan.of_length(STEPS).spike_at < first["grad_explosion"] < first["nonfinite_loss"] <= STEPS
    assert first["nonfinite_origin"] == first["nonfinite_grad"]
    assert "The collector detected" in demo.output and "grad_explosion" in demo.output
    assert demo.page.startswith(demo.url + "/runs/demo-fp16-")


def test_the_printed_page_tells_the_story(demo: Demo) -> None:
    first = first_steps(demo.events)
    with browser.chromium() as driver:
        browser.open_page(driver, demo.page)
        assert browser.console_errors(driver) == []
        lines = [li.text for li in driver.find_elements("css selector", "#diagnosis li")]
        steps = [int(re.match(r"step (\d+):", line).group(1)) for line in lines]
        assert steps == sorted(steps)
        story = {
            kind: next(line for line in lines if line.startswith(f"step {first[kind]}:") and words in line)
            for kind, words in (
                ("nonfinite_origin", "first non-finite values"),
                ("grad_explosion", "gradient explosion"),
                ("nonfinite_loss", "the loss became NaN"),
            )
        }
        assert lines.index(story["grad_explosion"]) < lines.index(story["nonfinite_loss"])
        browser.screenshot(driver, "demo-run-page")
        driver.set_window_size(1280, driver.execute_script("return document.body.scrollHeight") + 100)
        browser.screenshot(driver, "demo-run-page-full")
