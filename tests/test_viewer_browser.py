"""The viewer in a real browser: Playwright driving Debian's Chromium (installed by .ci/run).

Log in, upload a film, see the probabilities and the heatmap, switch label, see cycle 0 beside the
served cycle, open the model card; screenshots are saved as test artefacts
(tmp/test-artifacts/viewer_*.png, git-ignored, or $CXR_TEST_ARTIFACTS).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.viewer_support import PASSWORD, USER, bad_files, running_viewer

CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
EXAMPLE = ROOT / "pipeline" / "viewer" / "example_films" / "phantom_cardiomegaly.png"


def artefacts() -> Path:
    path = Path(os.environ.get("CXR_TEST_ARTIFACTS", ROOT / "tmp" / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        msg = f"{CHROMIUM} not found: `apt-get install -y chromium` (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    viewer = running_viewer()
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(viewer.url + "/")
    yield page
    context.close()


def login(page, password: str = PASSWORD) -> None:
    page.get_by_label("username").fill(USER)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def title_is(page, label: str) -> None:
    page.wait_for_function("(l) => { const t = document.querySelector('#heatmap-title'); "
                           "return t && t.innerText.includes(l); }", arg=label)


def test_wrong_password_stays_on_the_login_page(page):
    login(page, "not-the-password")
    page.get_by_text("Incorrect Credentials").wait_for()
    assert page.locator("#upload").count() == 0


def test_login_upload_see_probabilities_and_heatmaps_switch_label(page):
    viewer = running_viewer()
    login(page)
    page.locator("#upload").wait_for()
    page.locator("#upload input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#heatmap-latest img").wait_for()
    probs = page.locator("#probs").inner_text()
    labels = [r.get_attribute("data-label") for r in page.locator("#probs tr[data-label]").all()]
    assert len(labels) == 4 and "Cardiomegaly" in labels and "threshold" in probs and "cycle 0" in probs
    # cycle 0 vs latest, and the anatomy
    assert page.locator("#heatmap-baseline img").get_attribute("alt").startswith("cycle 0 (baseline)")
    assert "(served)" in page.locator("#heatmap-latest img").get_attribute("alt")
    assert page.locator("#anatomy img").get_attribute("src").startswith("data:image/png;base64,")
    top = labels[0]
    title_is(page, top)
    other = labels[-1]
    page.locator("#label-select").get_by_label(other).check()
    title_is(page, other)
    assert other in page.locator("#heatmap-baseline img").get_attribute("alt")
    page.locator("#model-card-box").get_by_text("Model card").click()
    page.locator("#model-card").get_by_text("not a medical device").first.wait_for()
    page.screenshot(path=str(artefacts() / "viewer_results.png"), full_page=True)
    # the upload was deleted once read, and no picture was written
    assert not [p for p in viewer.temp_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]


def test_a_bad_file_shows_a_message_and_the_page_keeps_working(page, tmp_path):
    login(page)
    page.locator("#upload").wait_for()
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(bad_files()["multi-frame dicom"])
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    page.locator("#message").get_by_text("Cannot analyse this file").wait_for()
    page.screenshot(path=str(artefacts() / "viewer_error.png"), full_page=True)
    page.locator("#examples input").click()
    page.get_by_role("option", name="phantom_pneumonia.dcm").click()   # a MONOCHROME1 DICOM example
    page.locator("#heatmap-latest img").wait_for()
    assert "ground truth" in page.locator("#message").inner_text()
