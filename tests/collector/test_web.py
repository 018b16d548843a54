"""The web view in a real browser: headless Chromium (Selenium) against a real collector
(``numwatch serve`` in a subprocess) holding real watched training runs.

Screenshots of every page land in test-artifacts/ (1280x800).
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import numwatch
from numwatch.monitor.ops import stack
from tests.support import browser

pytestmark = [pytest.mark.binaries, pytest.mark.slow]

STEPS = 40
BLOW_UP_AT = 17  # the input is multiplied so the first layer's fp16 output overflows at this step
LIVE_MORE = 6
MAX_NORM = 0.2  # below most steps' global norm, so most steps are clipped


def get_json(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def model_and_optimizer(lr: float = 1e-3) -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            embed=nn.Linear(16, 64), act=nn.GELU(), hidden=nn.Linear(64, 64), act2=nn.GELU(), head=nn.Linear(64, 4)
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, optimizer, torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10)


def train(
    watcher: numwatch.Watcher,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    first: int,
    last: int,
) -> None:
    """The AMP loop users write (scale, backward, unscale, clip, step, update); ``BLOW_UP_AT`` gets a huge input."""
    generator = torch.Generator().manual_seed(first)
    for step in range(first, last + 1):
        inputs = torch.randn(32, 16, generator=generator) * (1e6 if step == BLOW_UP_AT else 1.0)
        targets = torch.randint(0, 4, (32,), generator=generator)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(inputs), targets)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    watcher.flush()


@dataclass
class Served:
    url: str
    database_url: str
    run: str
    live_run: str
    live: tuple  # (watcher, model, optimizer, scaler) of the run kept open for the live test
    driver: Any


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("web")
    database_url = f"sqlite:///{workdir / 'numwatch.db'}"
    with browser.chromium() as driver, stack.running_collector(workdir, database_url) as url:
        train_attention_run(url)
        model, optimizer, scaler = model_and_optimizer()
        with numwatch.watch(
            model,
            optimizer,
            scaler=scaler,
            run="mlp-fp16",
            url=url,
            token=None,
            histogram_every=5,
            format_every=5,
            trace_activations=True,
            on_nonfinite="ignore",
            config={"loop": "amp", "lr": 1e-3},
        ) as watcher:
            train(watcher, model, optimizer, scaler, 1, STEPS)
        live_model, live_optimizer, live_scaler = model_and_optimizer(lr=1e-2)  # "lr A vs lr B" in the compare view
        live = numwatch.watch(
            live_model,
            live_optimizer,
            scaler=live_scaler,
            run="mlp-live",
            url=url,
            token=None,
            histogram_every=5,
            on_nonfinite="ignore",
        )
        try:
            train(live, live_model, live_optimizer, live_scaler, 1, 10)
            yield Served(
                url, database_url, "mlp-fp16", "mlp-live", (live, live_model, live_optimizer, live_scaler), driver
            )
        finally:
            live.close()


ATTENTION_RUN = "gpt-attention"
GROWING = "transformer.h.1.attn"


def train_attention_run(url: str) -> None:
    """A nanoGPT-style run whose second layer's query and key projections grow by 1.6x per step."""
    from tests.support.nanogpt import NanoGPT

    torch.manual_seed(0)
    model = NanoGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    with numwatch.watch(model, optimizer, run=ATTENTION_RUN, url=url, token=None, histogram_every=2) as watcher:
        for _ in range(10):
            idx = torch.randint(0, 64, (4, 16), generator=generator)
            model(idx, idx.roll(-1, 1))[1].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.get_submodule(GROWING).c_attn.weight[:64] *= 1.6
        watcher.flush()


def page(served: Served, path: str) -> Any:
    browser.console_errors(served.driver)
    browser.open_page(served.driver, served.url + path)
    assert not served.driver.find_elements("id", "page-error"), served.driver.find_element("id", "page-error").text
    return served.driver


def test_runs_page_lists_the_runs(served: Served) -> None:
    driver = page(served, "/")
    names = [a.text for a in driver.find_elements("css selector", "#runs-table a.run-link")]
    assert names[:2] == ["mlp-live", "mlp-fp16"]  # newest first
    row = driver.find_element("css selector", "tr[data-run='mlp-fp16']")
    assert "finished" in row.text and str(STEPS) in row.text and "nonfinite_grad" in row.text
    assert browser.console_errors(driver) == []
    browser.screenshot(driver, "runs-page")


def test_every_page_and_file_carries_the_security_headers(served: Served) -> None:
    for path in (
        "/",
        "/runs/mlp-fp16",
        "/runs/mlp-fp16/steps/3",
        "/compare?run=mlp-fp16",
        "/static/run.js",
        "/static/vendor/uPlot.iife.min.js",
        "/api/v1/runs",
    ):
        with urllib.request.urlopen(served.url + path, timeout=10) as response:
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy, (
                path
            )
            assert response.headers["X-Content-Type-Options"] == "nosniff", path


def plotted(driver: Any, chart: str) -> dict:
    return driver.execute_script(
        f"const c = Charts.registry[{json.dumps(chart)}]; return "
        f"{{x: c.uplot.data[0], y: c.uplot.data.slice(1), marks: c.marks.nonfinite, log: c.log}};"
    )


def test_run_page_charts_hold_exactly_the_points_the_api_returns(served: Served) -> None:
    driver = page(served, "/runs/mlp-fp16")
    assert browser.console_errors(driver) == []
    layout = get_json(served.url + "/static/charts.json")
    last = get_json(f"{served.url}/api/v1/runs/mlp-fp16")["last_step"]
    checked = 0
    for chart in layout["series_charts"]:
        page_data = plotted(driver, chart["id"])
        for k, series in enumerate(chart["series"]):
            api = get_json(
                f"{served.url}/api/v1/runs/mlp-fp16/series?"
                + urllib.parse.urlencode({"metric": series["metric"], "max_points": layout["max_points"], "end": last})
            )
            assert page_data["x"] == api["steps"], chart["id"]
            marks = {m["step"]: m["kind"] for m in page_data["marks"]}
            for step, value, shown in zip(api["steps"], api["values"], page_data["y"][k], strict=True):
                if isinstance(value, str):  # non-finite: a gap in the line, drawn as a coloured mark
                    assert (
                        shown is None and marks[step] == {"NaN": "nan", "Infinity": "inf", "-Infinity": "ninf"}[value]
                    )
                elif page_data["log"] and value <= 0:
                    assert shown is None
                else:
                    assert shown == value, (chart["id"], step)
                checked += 1
    assert checked >= STEPS * 4
    # The blow-up step is visible on the loss chart as non-finite.
    assert any(m["step"] == BLOW_UP_AT for m in plotted(driver, "loss")["marks"])


def test_attention_logit_lines_per_call_and_log_z_hold_the_api_values(served: Served) -> None:
    driver = page(served, f"/runs/{ATTENTION_RUN}")
    assert browser.console_errors(driver) == []
    api = get_json(f"{served.url}/api/v1/runs/{ATTENTION_RUN}/forward?max_points=1000")
    calls = list(api["attention_logit_max"])
    assert calls == [f"transformer.h.{i}.attn" for i in range(4)] and api["steps"] == [1, 3, 5, 7, 9]
    chart = plotted(driver, "attention_logit_max")
    assert chart["x"] == api["steps"] and chart["y"] == [api["attention_logit_max"][name] for name in calls]
    labels = driver.execute_script(
        "return Charts.registry.attention_logit_max.uplot.series.slice(1).map((s) => s.label)"
    )
    assert labels == calls
    log_z = plotted(driver, "log_z")
    assert log_z["x"] == api["steps"] and log_z["y"] == [api["log_z_mean"], api["log_z_max"], api["logit_absmax"]]
    (growth,) = [
        e for e in get_json(f"{served.url}/api/v1/runs/{ATTENTION_RUN}/events") if e["kind"] == "attention_logit_growth"
    ]
    assert driver.find_element("id", "attention-layers").text.startswith(f"{GROWING} (")
    item = [
        li for li in driver.find_elements("css selector", "#diagnosis li") if "attention logits above 100" in li.text
    ]
    assert item and item[0].text.startswith(f"step {growth['step']}:")
    browser.screenshot(driver, "run-page-attention")


def test_gradient_norm_chart_shows_the_norm_before_and_after_clipping(served: Served) -> None:
    driver = page(served, "/runs/mlp-fp16")
    data = plotted(driver, "grad_norm")
    labels = driver.execute_script("return Charts.registry.grad_norm.uplot.series.slice(1).map(s => s.label)")
    assert labels == ["pre-clip", "post-clip"]
    clipped = 0
    for pre, post in zip(*data["y"], strict=True):
        if pre is None:  # the non-finite step
            continue
        assert post == pytest.approx(min(pre, MAX_NORM), rel=1e-4)
        clipped += pre > MAX_NORM
    assert clipped > STEPS // 2
    coefficients = plotted(driver, "clip_coef")["y"][0]
    assert any(c is not None and c < 1 for c in coefficients)
    driver.execute_script("document.getElementById('chart-grad_norm').scrollIntoView()")
    browser.screenshot(driver, "run-page-charts")


def test_a_chart_with_nothing_recorded_keeps_its_height_and_says_so(served: Served) -> None:
    driver = page(served, f"/runs/{ATTENTION_RUN}")  # no clip function ran in this run
    clip = get_json(f"{served.url}/api/v1/runs/{ATTENTION_RUN}/series?metric=clip_coef")
    assert clip["steps"] == []
    boxes = driver.execute_script(
        "const empty = document.querySelector('#chart-clip_coef .plot');"
        "const drawn = document.querySelector('#chart-grad_norm .u-wrap');"
        "return {empty: empty.getBoundingClientRect().height, drawn: drawn.getBoundingClientRect().height,"
        " text: empty.textContent, uplot: Charts.registry.clip_coef.uplot};"
    )
    assert boxes["text"] == "nothing recorded for this chart" and boxes["uplot"] is None
    assert boxes["drawn"] > 150 and boxes["empty"] == boxes["drawn"]
    assert browser.console_errors(driver) == []


def test_dragging_zooms_every_chart_and_double_click_resets(served: Served) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    driver = page(served, "/runs/mlp-fp16")
    ranges = (
        "return Object.values(Charts.registry).filter(c => c.uplot && c.uplot.syncKey === 'run').map(c => "
        "[c.uplot.scales.x.min, c.uplot.scales.x.max])"
    )
    assert set(map(tuple, driver.execute_script(ranges))) == {(1, STEPS)}
    over = driver.find_element("css selector", "#chart-loss .u-over")
    width = over.size["width"]
    ActionChains(driver).move_to_element_with_offset(over, -width // 4, 0).click_and_hold().move_by_offset(
        width // 4, 0
    ).release().perform()
    zoomed = set(map(tuple, driver.execute_script(ranges)))
    assert len(zoomed) == 1  # every chart of the page follows
    low, high = zoomed.pop()
    assert 1 < low < high < STEPS and high - low < STEPS / 2
    ActionChains(driver).double_click(over).perform()
    assert set(map(tuple, driver.execute_script(ranges))) == {(1, STEPS)}
    # A single click opens the step under the cursor.
    ActionChains(driver).move_to_element(over).click().perform()
    browser.wait_for(driver, "return location.pathname.includes('/steps/')")
    step = int(driver.current_url.rsplit("/", 1)[1])
    assert abs(step - STEPS / 2) <= 2


def test_diagnosis_names_the_nan_step_and_its_origin_module(served: Served) -> None:
    driver = page(served, "/runs/mlp-fp16")
    origin = [e for e in get_json(f"{served.url}/api/v1/runs/mlp-fp16/events") if e["kind"] == "nonfinite_origin"]
    assert origin and origin[0]["step"] == BLOW_UP_AT and origin[0]["details"]["module"] == "embed"
    diagnosis = driver.find_element("id", "diagnosis")
    first = diagnosis.find_element("css selector", "li")
    assert first.text.startswith(f"step {BLOW_UP_AT}:") and "first non-finite" in first.text
    assert driver.find_element("id", "origin-module").text == "embed"
    assert first.find_element("css selector", "a").get_attribute("href").endswith(f"/runs/mlp-fp16/steps/{BLOW_UP_AT}")
    browser.screenshot(driver, "run-page")


def test_heatmap_marks_the_nonfinite_tensors(served: Served) -> None:
    driver = page(served, "/runs/mlp-fp16")
    step = get_json(f"{served.url}/api/v1/runs/mlp-fp16/steps/{BLOW_UP_AT}")
    bad = [name for name, stats in step["tensors"].items() if stats["nan_count"] or stats["inf_count"]]
    assert bad  # the non-finite loss makes every gradient of this step non-finite (mixed steps: the posted run below)

    nonfinite = {"NaN": (0xD0, 0x00, 0xD0), "Infinity": (0xE1, 0x1D, 0x1D)}
    for name in bad:
        value = step["tensors"][name]["grad_norm"]
        assert tuple(browser.heatmap_pixel(driver, name, BLOW_UP_AT)) == nonfinite[value], name
    for name in step["tensors"]:
        assert tuple(browser.heatmap_pixel(driver, name, BLOW_UP_AT - 1)) not in nonfinite.values(), name
    listed = driver.find_element("id", "heatmap-nonfinite").text
    assert all(name in listed for name in bad)


def test_histogram_shows_the_format_bands_at_torch_limits(served: Served) -> None:
    from numwatch.formats import format_spec

    driver = page(served, "/runs/mlp-fp16")
    bands = driver.execute_script("return Charts.FORMAT_BANDS")
    for name, band in bands.items():
        spec = format_spec(name)
        binade = lambda x: math.floor(math.log2(x))  # noqa: E731
        assert band["normal"] == [binade(spec.smallest_normal), binade(spec.max)], name
        assert band["subnormal"] == [binade(spec.smallest_subnormal), binade(spec.smallest_normal) - 1], name
    drawn = driver.execute_script("return Charts.registry.histogram.bands.map(b => b.name)")
    assert {"fp16", "bf16", "fp8_e4m3", "fp8_e5m2"} <= set(drawn)
    tensor = driver.execute_script("return document.getElementById('histogram-tensor').value")
    step = int(driver.execute_script("return document.getElementById('histogram-step').value"))
    assert step < BLOW_UP_AT  # the picture before the failure
    api = get_json(
        f"{served.url}/api/v1/runs/mlp-fp16/histograms?" + urllib.parse.urlencode({"tensor": tensor, "step": step})
    )
    data = driver.execute_script("const u = Charts.registry.histogram.uplot; return [u.data[0], u.data[1]];")
    shown = {b: c for b, c in zip(*data, strict=True) if c}
    assert shown == {b["binade"]: b["count"] for b in api["exponent"]}


def test_step_page_lists_every_tensor_worst_first(served: Served) -> None:
    driver = page(served, f"/runs/mlp-fp16/steps/{BLOW_UP_AT}")
    assert browser.console_errors(driver) == []
    step = get_json(f"{served.url}/api/v1/runs/mlp-fp16/steps/{BLOW_UP_AT}")
    rows = driver.find_elements("css selector", "#tensor-table tbody tr")
    assert len(rows) == len(step["tensors"])
    names = [r.find_element("css selector", "td").text for r in rows]
    bad = {name for name, s in step["tensors"].items() if s["nan_count"] or s["inf_count"]}
    assert set(names[: len(bad)]) == bad
    assert "skipped" in driver.find_element("id", "step-events").text
    browser.screenshot(driver, "step-page")


def test_run_page_lists_the_weights_worst_quantized_first(served: Served) -> None:
    driver = page(served, "/runs/mlp-fp16")
    table = get_json(f"{served.url}/api/v1/runs/mlp-fp16/quantization")
    assert table["step"] == STEPS  # close() measured the final weights
    rows = driver.find_elements("css selector", "#quantization-table tbody tr")
    names = [r.find_element("css selector", "td").text for r in rows]
    assert names == [t["tensor"] for t in table["tensors"]]
    assert sorted(names) == ["embed.weight", "head.weight", "hidden.weight"]  # the biases are not quantized
    int4 = [float(r.find_elements("css selector", "td")[3].text) for r in rows]
    assert int4 == sorted(int4)
    assert browser.console_errors(driver) == []


def test_compare_view_overlays_two_runs(served: Served) -> None:
    driver = page(served, "/compare?run=mlp-fp16&run=mlp-live&metric=loss")
    assert browser.console_errors(driver) == []
    labels = driver.execute_script("return Charts.registry.compare.uplot.series.slice(1).map(s => s.label)")
    assert labels == ["mlp-fp16", "mlp-live"]
    data = plotted(driver, "compare")
    for k, run in enumerate(("mlp-fp16", "mlp-live")):
        api = get_json(f"{served.url}/api/v1/runs/{run}/series?metric=loss&max_points=1000")
        finite = {s: v for s, v in zip(api["steps"], api["values"], strict=True) if not isinstance(v, str)}
        assert {x: y for x, y in zip(data["x"], data["y"][k], strict=True) if y is not None} == finite
    browser.screenshot(driver, "compare-page")


def test_live_page_picks_up_steps_posted_after_it_loaded(served: Served) -> None:
    driver = page(served, f"/runs/{served.live_run}")
    before = plotted(driver, "loss")["x"]
    assert before[-1] == 10
    watcher, model, optimizer, scaler = served.live
    train(watcher, model, optimizer, scaler, 11, 10 + LIVE_MORE)
    browser.wait_for(driver, f"return document.body.dataset.liveStep === '{10 + LIVE_MORE}'", timeout=20)
    after = plotted(driver, "loss")["x"]
    assert after == list(range(1, 11 + LIVE_MORE))
    assert driver.find_element("id", "run-last-step").text == str(10 + LIVE_MORE)
    assert browser.console_errors(driver) == []


# -- hostile names -----------------------------------------------------------------------------

IMG = "<img src=x onerror=window.__pwned=1>"
SCRIPT = '"><script>window.__pwned=2</script>'
SVG = '"><svg onload=window.__pwned=3>'
XSS_STEP = 4


def post(url: str, path: str, body: dict, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def post_run(
    url: str,
    run: str,
    project: str,
    specs: list[dict],
    token: str | None = None,
    modules: tuple[str, ...] = (),
    config: dict | None = None,
) -> None:
    """A run of three tensors and ``XSS_STEP + 2`` steps posted as the protocol's documents; at
    ``XSS_STEP`` the first tensor's norm is NaN and the second's +Inf, the third finite."""
    from numwatch import protocol
    from tests.support.collector_docs import array, step_doc

    post(
        url,
        "/api/v1/runs",
        dict(protocol.run_document(run, format="fp16", tensors=specs, project=project, modules=modules, config=config)),
        token,
    )
    steps = []
    for step in range(1, XSS_STEP + 3):
        norms, inf = [0.5 * step, 0.25, 0.125], [0, 0, 0]
        if step == XSS_STEP:
            norms[:2], inf[1] = [math.nan, math.inf], 2
        steps.append(step_doc(step, norms, tensors={"inf_count": array(inf, "<i8")}))
    origin = protocol.event_document(
        XSS_STEP,
        "nonfinite_origin",
        {"tensors": [{"name": specs[0]["name"], "nan": 3, "inf": 0}], "module": modules[0] if modules else None},
    )
    path = "/api/v1/runs/" + urllib.parse.quote(run, safe="") + "/batches"
    post(url, path, dict(protocol.batch_document(run, steps=steps, events=[origin], status="finished")), token)


def tensors(*names: str) -> list[dict]:
    return [{"name": name, "shape": [4, 4], "dtype": "float32", "group": 0} for name in names]


def test_client_strings_render_as_text_and_never_run(served: Served) -> None:
    post_run(served.url, IMG, SCRIPT, tensors(IMG, SCRIPT, "plain.weight"), modules=(SVG, IMG), config={IMG: SCRIPT})
    post_run(served.url, SVG, IMG, tensors(IMG, SCRIPT, "plain.weight"))
    driver = served.driver
    pages = [
        "/",
        f"/runs/{urllib.parse.quote(IMG, safe='')}",
        f"/runs/{urllib.parse.quote(IMG, safe='')}/steps/{XSS_STEP}",
        f"/compare?run={urllib.parse.quote(IMG, safe='')}&run={urllib.parse.quote(SVG, safe='')}"
        "&metric=global_grad_norm",
    ]
    for path in pages:
        page(served, path)
        assert driver.execute_script("return typeof window.__pwned") == "undefined", path
        assert driver.execute_script("return document.querySelectorAll('img, svg, main script').length") == 0, path
        assert browser.console_errors(driver) == [], path
    page(served, "/")
    texts = {a.text for a in driver.find_elements("css selector", "#runs-table a.run-link")}
    assert {IMG, SVG} <= texts
    assert SCRIPT in driver.find_element("id", "runs-table").text  # the project, as text
    page(served, f"/runs/{urllib.parse.quote(IMG, safe='')}")
    assert driver.find_element("id", "run-name").text == IMG
    assert driver.find_element("id", "origin-module").text == SVG
    assert IMG in driver.find_element("id", "diagnosis").text  # the origin tensor, as text
    assert driver.execute_script("return document.querySelector('details.config').textContent").endswith(IMG + SCRIPT)
    heat = driver.execute_script("return Charts.registry.heatmap.layout.names")
    assert heat == [IMG, SCRIPT, "plain.weight"]
    browser.screenshot(driver, "hostile-names-run-page")
    page(served, f"/runs/{urllib.parse.quote(IMG, safe='')}/steps/{XSS_STEP}")
    names = [
        r.find_element("css selector", "td").text
        for r in driver.find_elements("css selector", "#tensor-table tbody tr")
    ]
    assert set(names[:2]) == {IMG, SCRIPT} and names[2] == "plain.weight"  # worst (non-finite) first
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_an_exported_page_of_hostile_names_keeps_them_text(served: Served, tmp_path: Path) -> None:
    from numwatch.monitor.ops.cli import main

    post_run(
        served.url,
        "exported-" + IMG,
        SCRIPT,
        tensors(SCRIPT, IMG, "plain.weight"),
        modules=(SCRIPT,),
        config={SCRIPT: IMG},
    )
    output = tmp_path / "hostile.html"
    assert main(["export", "exported-" + IMG, "-o", str(output), "--database-url", served.database_url]) == 0
    assert "</script>" not in output.read_text().split('id="numwatch-data">', 1)[1].rsplit("</script>", 1)[0]
    browser.open_page(served.driver, output.as_uri())
    driver = served.driver
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    assert driver.find_element("id", "run-name").text == "exported-" + IMG
    assert driver.find_element("id", "origin-module").text == SCRIPT
    assert driver.execute_script("return document.querySelectorAll('img, svg, main script').length") == 0
    assert browser.console_errors(driver) == []


def test_heatmap_colours_nan_inf_and_finite_cells_of_one_step_apart(served: Served) -> None:
    post_run(served.url, "mixed-step", "default", tensors("a.nan", "b.inf", "c.finite"))
    driver = page(served, "/runs/mixed-step")
    assert browser.heatmap_pixel(driver, "a.nan", XSS_STEP) == [0xD0, 0x00, 0xD0]
    assert browser.heatmap_pixel(driver, "b.inf", XSS_STEP) == [0xE1, 0x1D, 0x1D]
    finite = browser.heatmap_pixel(driver, "c.finite", XSS_STEP)
    assert finite not in ([0xD0, 0x00, 0xD0], [0xE1, 0x1D, 0x1D], [0x1D, 0x4E, 0xD8])
    assert browser.heatmap_pixel(driver, "a.nan", XSS_STEP - 1) != [0xD0, 0x00, 0xD0]
    listed = driver.find_element("id", "heatmap-nonfinite").text
    assert "a.nan" in listed and "b.inf" in listed and "c.finite" not in listed


# -- export ------------------------------------------------------------------------------------


def test_export_is_one_file_that_works_offline(served: Served, tmp_path: Path) -> None:
    from numwatch.monitor.ops.cli import main

    output = tmp_path / "run.html"
    assert main(["export", "mlp-fp16", "-o", str(output), "--database-url", served.database_url]) == 0
    text = output.read_text()
    assert "/static/" not in text.replace('"/static/charts.json"', "")  # every asset inlined
    browser.console_errors(served.driver)
    browser.open_page(served.driver, output.as_uri())
    driver = served.driver
    assert not driver.find_elements("id", "page-error"), driver.find_element("id", "page-error").text
    assert browser.console_errors(driver) == []
    assert (
        driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    )  # no request left the page
    assert driver.find_element("id", "origin-module").text == "embed"
    api = get_json(f"{served.url}/api/v1/runs/mlp-fp16/series?metric=global_grad_norm&max_points=1000&end={STEPS}")
    assert plotted(driver, "grad_norm")["x"] == api["steps"]
    forward = get_json(f"{served.url}/api/v1/runs/mlp-fp16/forward?max_points=1000")
    assert (
        forward["steps"] and plotted(driver, "log_z")["y"][0] == forward["log_z_mean"]
    )  # the MLP's output is its logits
    assert driver.execute_script("return Charts.registry.histogram.uplot.data[1].filter(v => v).length") > 0


# -- auth --------------------------------------------------------------------------------------


def make_token(database_url: str, project: str) -> str:
    import contextlib
    import io

    from numwatch.monitor.ops.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["token", "create", "--project", project, "--database-url", database_url]) == 0
    return out.getvalue().strip().splitlines()[-1]


def test_with_auth_pages_ask_for_a_token_and_show_only_its_project(served: Served, tmp_path: Path) -> None:
    from numwatch.monitor.ops.cli import main

    database_url = f"sqlite:///{tmp_path / 'auth.db'}"
    assert main(["db", "upgrade", "--database-url", database_url]) == 0
    token_a, token_b = make_token(database_url, "team-a"), make_token(database_url, "team-b")
    driver = served.driver
    with stack.running_collector(tmp_path, database_url, extra_args=("--auth", "token")) as url:
        post_run(url, "run-of-a", "team-a", tensors("a", "b", "c"), token_a)
        post_run(url, "run-of-b", "team-b", tensors("a", "b", "c"), token_b)
        for path in ("/", "/runs/run-of-a", "/runs/run-of-b/steps/2", "/compare?run=run-of-a"):
            browser.open_page(driver, url + path)
            assert driver.find_elements("id", "token-form"), path
            assert not driver.find_elements("css selector", "#runs-table, #diagnosis, #tensor-table, .chart"), path
            assert "run-of" not in driver.find_element("id", "main").text or path != "/", path
        browser.open_page(driver, url + "/runs/run-of-a")
        browser.screenshot(driver, "token-prompt")
        driver.find_element("id", "token-input").send_keys(token_a)
        driver.find_element("css selector", "#token-form button").click()
        browser.wait_for(
            driver, "return document.body.dataset.ready === 'true' && !!document.getElementById('diagnosis')"
        )
        assert driver.find_element("id", "run-name").text == "run-of-a"
        assert token_a not in driver.current_url
        assert driver.execute_script("return sessionStorage.getItem('numwatch.readToken')") == token_a
        browser.open_page(driver, url + "/")
        assert [a.text for a in driver.find_elements("css selector", "#runs-table a.run-link")] == ["run-of-a"]
        for path in ("/runs/run-of-b", "/runs/run-of-b/steps/2", "/compare?run=run-of-b"):
            browser.open_page(driver, url + path)
            error = driver.find_element("id", "page-error").text
            assert "404" in error and "unknown run" in error, path
            assert not driver.find_elements("css selector", "#diagnosis, #tensor-table, .chart .u-wrap"), path
        driver.find_element("id", "sign-out").click()
        browser.wait_for(driver, "return !!document.getElementById('token-form')")
        assert driver.execute_script("return sessionStorage.getItem('numwatch.readToken')") is None
    with stack.running_collector(tmp_path, database_url, extra_args=("--auth", "token", "--open-reads")) as url:
        browser.open_page(driver, url + "/runs/run-of-b")
        assert not driver.find_elements("id", "token-form")
        assert driver.find_element("id", "run-name").text == "run-of-b"
    browser.console_errors(driver)  # the refused reads above are logged by the browser; drop them


def test_run_page_lists_the_linears_to_keep_in_bf16_and_maps_their_input_sqnr(served: Served) -> None:
    driver = page(served, "/runs/mlp-fp16")
    assert browser.console_errors(driver) == []
    table = get_json(f"{served.url}/api/v1/runs/mlp-fp16/gemm")
    assert table["step"] == 36  # gemm_every defaults to histogram_every (5): steps 1, 6, ..., 36
    assert table["rows"] == 32  # the default row sample: the page says the numbers are estimates
    assert "Estimates from 32 evenly spaced rows" in driver.find_element("id", "gemm-rows").text
    rows = driver.find_elements("css selector", "#gemm-table tbody tr")
    names = [r.find_element("css selector", "td").text for r in rows]
    assert names == [layer["tensor"] for layer in table["layers"]]
    assert sorted(names) == ["embed.weight", "head.weight", "hidden.weight"]  # the biases are no matmul weights
    assert ["keep-bf16" in r.get_attribute("class") for r in rows] == [layer["keep_bf16"] for layer in table["layers"]]
    worst = [float(r.find_elements("css selector", "td")[3].text) for r in rows]
    assert worst == sorted(worst)
    heat = driver.execute_script("return Charts.registry['gemm-heatmap'].layout")
    assert heat["names"] == ["embed.weight", "hidden.weight", "head.weight"]  # model order
    assert heat["steps"] == list(range(1, STEPS + 1, 5))
    driver.execute_script("document.getElementById('gemm-box').scrollIntoView()")
    browser.screenshot(driver, "gemm-readiness")
