"""report.html in a real browser: Debian's chromium driven by Playwright, with the network cut off.

Skipped (and counted as skipped) only where chromium or playwright is missing; `make test`
installs both (chromium from Debian, `make data`; never `playwright install`).
"""

from pathlib import Path

import pytest

from bnlab.experiments import RunStore, parse_config, run_sweep
from bnlab.report.sweeps import html_report

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: apt-get install chromium")]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """report.html of a sweep over bn and lr (two grid axes, one numeric: the plotly view appears)."""
    d = tmp_path_factory.mktemp("browser")
    cfg = parse_config({"name": "bn-lr", "dataset": "digits", "seeds": [0, 1],
                        "fixed": {"model": "keras-mlp", "epochs": 2, "batch_size": 32, "train_limit": 300,
                                  "test_limit": 200},
                        "grid": {"bn": ["none", "after"], "lr": [0.0001, 0.03]}})
    run_sweep(cfg, d / "s.db", workers=1, threads=1, log=lambda *_: None)
    with RunStore(d / "s.db") as st:
        return html_report(st, "bn-lr", d / "report.html")


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 900})
        finally:
            browser.close()


def test_report_renders_offline_without_errors_answer_first(report, page):
    errors, fetched = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def offline(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            fetched.append(route.request.url)
            route.abort()

    page.route("**/*", offline)
    page.goto(report.resolve().as_uri(), wait_until="load")
    plots = page.locator(".js-plotly-plot")
    plots.first.locator("svg.main-svg").first.wait_for()

    assert fetched == [] and errors == []
    widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 3 and all(w > 0 for w in widths)
    assert plots.count() == 2  # parallel coordinates; test accuracy against lr
    assert all(plots.nth(i).locator("svg.main-svg").count() > 0 for i in range(2))
    assert page.locator(".js-plotly-plot .parcoords").count() == 1
    verdict = page.locator("#verdict")
    assert verdict.is_visible() and "bn=" in verdict.inner_text()
    before = page.evaluate("""() => {
        const verdict = document.querySelector('#verdict'), figure = document.querySelector('img, .js-plotly-plot');
        return Boolean(verdict.compareDocumentPosition(figure) & Node.DOCUMENT_POSITION_FOLLOWING)
            && verdict.getBoundingClientRect().bottom <= figure.getBoundingClientRect().top;
    }""")
    assert before
