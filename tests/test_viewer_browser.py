"""The viewer in a real browser: Playwright driving Debian's Chromium (installed by .ci/run).

Log in, upload a film, see the probabilities and the heatmap, switch label, see cycle 0 beside the
served cycle, open the model card; screenshots are saved as test artefacts
(tmp/test-artifacts/viewer_*.png, git-ignored, or $CXR_TEST_ARTIFACTS).
"""
from __future__ import annotations

import pytest

from tests.browser_support import artefacts, login, open_page, title_is
from tests.conftest import ROOT
from tests.viewer_support import bad_files, running_viewer

EXAMPLE = ROOT / "pipeline" / "viewer" / "example_films" / "phantom_cardiomegaly.png"


@pytest.fixture
def page(browser):
    context, page = open_page(browser, running_viewer().url)
    yield page
    context.close()


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
