"""The training dashboard in Voila, in a real (headless) browser.

Change a control, press Start, and check that the live plot really arrives in the page as
a picture (not the text ``<Figure size ...>``), that Stop ends the run, and that the run
gets its row in the table. Voila serves the notebook with the runs going to the test's
temporary directory; nothing is left running afterwards.
"""

import json
import os
from pathlib import Path

import pytest

from .conftest import ROOT
from .servers import server

CHROMIUM = Path("/usr/bin/chromium")
VOILA = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "voila"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PNG = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]

READ_IMAGE = """async (img) => {
    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
    return {src: img.src, size: bytes.length, head: Array.from(bytes.slice(0, 8)),
            width: img.naturalWidth, height: img.naturalHeight};
}"""


@pytest.fixture
def voila(no_leftovers):
    tmp_path = no_leftovers
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `bash scripts/system_deps.sh` as root")
    env = dict(os.environ, LABKIT_RUNS_DIR=str(tmp_path / "runs"))
    args = [VOILA, "--no-browser", "--Voila.ip=127.0.0.1", "notebooks/dashboards/training.ipynb"]
    with server(args, ROOT, env, tmp_path / "voila.log") as port:
        yield f"http://127.0.0.1:{port}/", tmp_path


def read_image(page, selector):
    return page.locator(selector).evaluate(READ_IMAGE)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dashboard_trains_live_in_the_browser(voila):
    from playwright.sync_api import expect, sync_playwright

    url, tmp_path = voila
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1500})
            page.set_default_timeout(120_000)
            page.goto(url)
            start = page.locator("button", has_text="Start")
            expect(start).to_be_enabled()
            assert "<Figure size" not in page.content()
            placeholder = read_image(page, "img.labkit-learning-plot")

            # a control changed in the page reaches the kernel: topk brings its parameter
            page.locator(".widget-dropdown", has_text="compression").locator("select").select_option("topk")
            expect(page.locator(".widget-text", has_text="ratio")).to_be_visible()
            workers = page.locator(".widget-slider", has_text="workers")
            for _ in range(2):
                workers.locator(".noUi-handle").press("ArrowLeft")
            expect(workers.locator(".widget-readout")).to_have_text("2")
            steps = page.locator(".widget-text", has_text="steps").locator("input")
            steps.fill("5000")
            steps.press("Enter")
            start.click()

            status = page.locator(".labkit-status")
            expect(status).to_contain_text("running: step", timeout=150_000)
            page.wait_for_function(
                "src => document.querySelector('img.labkit-learning-plot').src !== src",
                arg=placeholder["src"], timeout=30_000)
            learning = read_image(page, "img.labkit-learning-plot")
            assert learning["head"] == PNG and learning["size"] > max(20_000, placeholder["size"])
            assert learning["width"] >= 600 and learning["height"] >= 300
            assert read_image(page, "img.labkit-system-plot")["head"] == PNG

            page.locator("button", has_text="Stop").click()
            expect(status).to_contain_text("stopped", timeout=60_000)
            table = page.locator(".labkit-run-table")
            expect(table.locator("tbody tr")).to_have_count(1)
            cells = table.locator("tbody td").all_inner_texts()
            assert cells[1:6] == ["data", "allreduce", "topk (ratio=0.01)", "2", "stopped"]
            expect(start).to_be_enabled()
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
        finally:
            browser.close()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
