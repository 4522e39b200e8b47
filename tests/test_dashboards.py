"""Every dashboard of notebooks/dashboards/ in Voila, in a real (headless) browser.

One Voila server serves the whole folder (with preheated kernels, as docs/dashboards.md
recommends) and one Chromium opens each page in turn. For each
dashboard: the page renders with no source code in it, a picture arrives as a real PNG (not the
text ``<Figure size ...>``), a control changed in the page changes the picture, and a screenshot
is kept in the test's temporary directory. The time from opening the page to its first picture is
printed for each. The index page links every dashboard. Runs, searches and measurements go to
the test's temporary directory; nothing is left running afterwards.
"""

import os
import time
from pathlib import Path

import pytest

from .conftest import ROOT, labkit_processes
from .servers import server
from .test_dashboard import CHROMIUM, CHROMIUM_ARGS, PNG, READ_IMAGE, VOILA

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]
PLOT = "img.labkit-plot"
TIMEOUT_MS = 120_000
FIRST_PICTURE = """() => Array.from(document.querySelectorAll('img.labkit-plot'))
                          .some(img => img.complete && img.naturalWidth > 0)"""
# The settings docs/dashboards.md recommends: no cut-off on a long first cell, and a kernel per
# page started and run with the server (preheated), so that a page opens already drawn. The
# pool is not refilled during the test (fill_delay): a refill runs the page again, for nobody.
VOILA_ARGS = ["--no-browser", "--Voila.ip=127.0.0.1", "--VoilaExecutor.timeout=300", "--show_tracebacks=True",
              "--preheat_kernel=True", "--pool_size=1", "--VoilaKernelManager.fill_delay=600",
              "--VoilaKernelManager.preheat_denylist=training.ipynb"]  # test_dashboard.py tests that one
FIRST_PICTURE_S: dict[str, float] = {}


@pytest.fixture(scope="module")
def voila(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `bash scripts/system_deps.sh` as root")
    tmp = tmp_path_factory.mktemp("dashboards")
    env = dict(os.environ, LABKIT_RUNS_DIR=str(tmp / "runs"), LABKIT_DASHBOARDS_DIR=str(tmp / "measured"))
    with server([VOILA, *VOILA_ARGS, "notebooks/dashboards"], ROOT, env, tmp / "voila.log") as port:
        yield f"http://127.0.0.1:{port}/voila/render/", tmp
    # the server and its kernels are gone; so is every rank, run and search they started
    deadline = time.time() + 10
    while labkit_processes(str(tmp)) and time.time() < deadline:
        time.sleep(0.2)
    assert not labkit_processes(str(tmp)), "processes left behind"
    print("first picture (s): " + ", ".join(f"{k} {v:.1f}" for k, v in FIRST_PICTURE_S.items()))


@pytest.fixture(scope="module")
def browser(voila):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """One dashboard opened in the browser, with the first picture timed."""

    def __init__(self, browser, voila, name):
        url, self.tmp = voila
        self.name = name
        self.page = browser.new_page(viewport={"width": 1200, "height": 1600})
        self.page.set_default_timeout(TIMEOUT_MS)
        start = time.monotonic()
        self.page.goto(url + name, timeout=TIMEOUT_MS)
        self.page.wait_for_function(FIRST_PICTURE, timeout=TIMEOUT_MS)
        FIRST_PICTURE_S[name] = time.monotonic() - start
        print(f"{name}: first picture {FIRST_PICTURE_S[name]:.1f} s after opening the page "
              f"(load average {os.getloadavg()[0]:.1f})")

    def check_rendered(self, code: str):
        html = self.page.content()
        assert "<Figure size" not in html
        assert code not in html, "the source code is shown"
        assert "Traceback" not in html and "Error" not in self.page.inner_text("body")

    def image(self, selector):
        return self.page.locator(selector).evaluate(READ_IMAGE)

    def wait_changed(self, selector, before, timeout=TIMEOUT_MS):
        self.page.wait_for_function("([sel, src]) => document.querySelector(sel).src !== src",
                                    arg=[selector, before["src"]], timeout=timeout)
        after = self.image(selector)
        assert after["head"] == PNG and after["width"] >= 400
        return after

    def screenshot(self):
        shot = self.tmp / f"{Path(self.name).stem}.png"
        self.page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        self.page.close()


def png_of(page, selector):
    image = page.image(selector)
    assert image["head"] == PNG and image["width"] >= 400, image
    return image


def slider_right(page, label, presses=1):
    slider = page.page.locator(".widget-slider", has_text=label).first
    for _ in range(presses):
        slider.locator(".noUi-handle").press("ArrowRight")
    return slider


def test_collectives(browser, voila):
    from playwright.sync_api import expect

    page = Page(browser, voila, "collectives.ipynb")
    page.check_rendered("CollectivesDashboard()")
    sel = "img.labkit-collectives-steps-plot"
    before = png_of(page, sel)
    png_of(page, "img.labkit-collectives-topology-plot")
    expect(page.page.get_by_text("6 steps recorded from labkit's code")).to_be_visible()  # ring, 4 ranks
    slider = slider_right(page, "step", 2)
    expect(slider.locator(".widget-readout")).to_have_text("2")
    after = page.wait_changed(sel, before)
    page.page.locator(".widget-dropdown", has_text="algorithm").locator("select").select_option("tree")
    expect(page.page.get_by_text("5 steps recorded from labkit's code")).to_be_visible()
    page.wait_changed(sel, after)
    page.screenshot()


def test_compression(browser, voila):
    page = Page(browser, voila, "compression.ipynb")
    page.check_rendered("CompressionDashboard()")
    sel = "img.labkit-compression-plot"
    before = png_of(page, sel)
    page.page.locator(".widget-dropdown", has_text="curve").locator("select").select_option("powersgd")
    after = page.wait_changed(sel, before)
    slider_right(page, "steps", 3)
    page.wait_changed(sel, after)
    page.screenshot()


def test_parallelism(browser, voila):
    from playwright.sync_api import expect

    page = Page(browser, voila, "parallelism.ipynb")
    page.check_rendered("ParallelismDashboard()")
    sel = "img.labkit-parallelism-timeline-plot"
    before = png_of(page, sel)
    png_of(page, "img.labkit-parallelism-memory-plot")
    slider = slider_right(page, "micro-batches", 2)
    expect(slider.locator(".widget-readout")).to_have_text("6")
    after = page.wait_changed(sel, before)
    page.page.get_by_role("button", name="gpipe").click()
    page.wait_changed(sel, after)
    page.screenshot()


def test_scaling_makes_the_missing_runs(browser, voila):
    from playwright.sync_api import expect

    page = Page(browser, voila, "scaling.ipynb")
    page.check_rendered("ScalingDashboard()")
    sel = "img.labkit-scaling-plot"
    before = png_of(page, sel)
    workers = page.page.locator(".widget-text", has_text="workers").locator("input")
    # one worker, strong scaling: the grid lacks one run (the cheapest there is: one rank)
    workers.fill("1")
    workers.press("Enter")
    page.page.locator(".widget-dropdown", has_text="grid").locator("select").select_option(label="strong")
    after = page.wait_changed(sel, before)
    page.page.get_by_role("button", name="Make the missing runs").click()
    expect(page.page.locator(".labkit-status")).to_contain_text("run 1/1 done", timeout=240_000)
    page.wait_changed(sel, after)
    (run,) = (page.tmp / "runs").iterdir()
    assert (run / "summary.json").exists() and (run / "metrics.jsonl").exists()
    page.screenshot()


def test_search_runs_a_search_for_the_slider(browser, voila):
    from playwright.sync_api import expect

    page = Page(browser, voila, "search.ipynb")
    page.check_rendered("SearchDashboard()")
    sel = "img.labkit-search-plot"
    before = png_of(page, sel)
    slider = slider_right(page, "λ2", 2)
    expect(slider.locator(".widget-readout")).to_have_text("1")
    after = page.wait_changed(sel, before)
    page.page.get_by_role("button", name="Run this search").click()
    expect(page.page.locator(".labkit-status")).to_contain_text("searched in", timeout=240_000)
    page.wait_changed(sel, after)
    (search_dir,) = [p for p in (page.tmp / "runs").iterdir() if "nas" in p.name]
    assert (search_dir / "summary.json").exists() and (search_dir / "latency_table.json").exists()
    page.screenshot()


def test_index_links_every_dashboard(browser, voila):
    url, tmp = voila
    page = browser.new_page()
    page.goto(url + "index.ipynb", timeout=TIMEOUT_MS)
    links = page.locator("a[href$='.ipynb']")
    links.first.wait_for(timeout=TIMEOUT_MS)
    hrefs = {href.rsplit("/", 1)[-1] for href in links.evaluate_all("as => as.map(a => a.href)")}
    on_disk = {p.name for p in (ROOT / "notebooks" / "dashboards").glob("*.ipynb")} - {"index.ipynb"}
    assert hrefs == on_disk
    assert all(h.startswith(url) for h in links.evaluate_all("as => as.map(a => a.href)"))
    page.screenshot(path=str(tmp / "index.png"), full_page=True)
    page.close()
