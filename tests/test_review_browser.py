"""Review mode in a real browser (Playwright driving Debian's Chromium, as tests/test_viewer_browser.py):
a reviewer logs in, marks a label's call and heatmap, sets a box by clicking two corners and by
typing it, saves with the keyboard, reloads and sees the mark; a viewer-role user never sees the tab.
Screenshots: tmp/test-artifacts/review_*.png (or $CXR_TEST_ARTIFACTS). The viewer runs over a copy
of the session's trained_project, so this module joins its xdist group (tests/conftest.py)."""
from __future__ import annotations

import re

import pytest

from pipeline import feedback
from pipeline.config import Paths
from tests.browser_support import artefacts, open_page
from tests.review_support import BROWSER_PASSWORD, BROWSER_REVIEWER, review_viewer
from tests.viewer_support import PASSWORD, USER


@pytest.fixture
def page(browser):
    context, page = open_page(browser, review_viewer().url)
    yield page
    context.close()


def log_in(page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def open_review(page) -> None:
    page.get_by_role("tab", name="Review").click()
    page.locator("#review-progress").get_by_text(re.compile(r"\d+ of \d+ reviewed")).wait_for()
    page.locator("#review-pick img").wait_for()


def film_id(page) -> str:
    return re.search(r"Film (\S+)", page.locator("#review-film").inner_text()).group(1)


def test_a_viewer_role_user_does_not_see_the_review_tab(page):
    log_in(page, USER, PASSWORD)
    page.locator("#upload").wait_for()
    page.wait_for_timeout(1500)   # the page load that would show the tab has run
    assert page.get_by_role("tab", name="Review").count() == 0
    assert page.locator("#review-save").count() == 0


def test_review_session_mark_a_label_box_it_save_reload_and_see_the_mark(page):
    viewer = review_viewer()
    log_in(page, BROWSER_REVIEWER, BROWSER_PASSWORD)
    open_review(page)
    progress = page.locator("#review-progress").inner_text()
    total = int(re.search(r"of (\d+) reviewed", progress).group(1))
    first = film_id(page)
    assert f"1 of {total}" in page.locator("#review-film").inner_text()
    rows = page.locator("#review-probs tr[data-label]")
    assert rows.count() == 4 and "cycle 0" in page.locator("#review-probs").inner_text()
    assert page.locator("#heatmap-latest img").get_attribute("alt").startswith("cycle")
    assert page.locator("#heatmap-baseline img").get_attribute("alt").startswith("cycle 0 (baseline)")
    assert page.locator("#anatomy img").get_attribute("src").startswith("data:image/png;base64,")
    label = page.locator("#review-label input:checked").get_attribute("value")

    # n / p move between films, the progress line stays
    page.locator("body").press("n")
    page.wait_for_function("(f) => !document.querySelector('#review-film').innerText.includes(f)", arg=first)
    assert f"2 of {total}" in page.locator("#review-film").inner_text()
    page.locator("body").press("p")
    page.wait_for_function("(f) => document.querySelector('#review-film').innerText.includes(f)", arg=first)

    # the call and the heatmap, by keyboard (a = agree, 2 = on a shortcut)
    page.locator("body").press("a")
    page.locator("body").press("2")
    assert page.locator("#review-call input[value='agree']").is_checked()
    assert page.locator("#review-heatmap input[value='shortcut']").is_checked()

    # a box by two clicks on the film: the four fields fill in
    img = page.locator("#review-pick img")
    img.scroll_into_view_if_needed()
    side = int(img.get_attribute("data-size"))
    box = img.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.10, box["y"] + box["height"] * 0.12)
    page.locator("#review-status").get_by_text("First corner").wait_for()
    page.mouse.click(box["x"] + box["width"] * 0.30, box["y"] + box["height"] * 0.25)
    page.locator("#review-status").get_by_text("press Add box").wait_for()
    x = int(page.locator("#box-x input").input_value())
    w = int(page.locator("#box-w input").input_value())
    assert abs(x - int(0.10 * side)) <= 1 and abs(w - (int(0.30 * side) - int(0.10 * side) + 1)) <= 1
    page.locator("#box-add").click()
    page.locator("#review-boxes li").first.wait_for()

    # and one typed in: a shortcut box around a marker
    for field, value in (("x", 2), ("y", 3), ("w", 5), ("h", 6)):
        page.locator(f"#box-{field} input").fill(str(value))
        page.locator(f"#box-{field} input").press("Tab")
    page.locator("#box-kind input").click()
    page.get_by_role("option", name="shortcut").click()
    page.locator("#box-add").click()
    page.locator("#review-boxes li").nth(1).wait_for()
    assert "shortcut (marker) at x 2, y 3, 5×6 px" in page.locator("#review-boxes").inner_text()
    page.screenshot(path=str(artefacts() / "review_marking.png"), full_page=True)

    # save with the keyboard (outside a text field)
    page.locator("#review-save").focus()
    page.keyboard.press("s")
    page.locator("#review-status").get_by_text("Saved").wait_for()
    marks = feedback.load_feedback(Paths(viewer.root)).query("reviewer == @BROWSER_REVIEWER")
    assert len(marks) == 1
    saved = marks.iloc[0]
    assert (saved["image_id"], saved["label"], saved["call"], saved["heatmap"]) == (first, label, "agree", "shortcut")
    assert [b["kind"] for b in saved["boxes"]] == ["evidence", "shortcut"]
    assert saved["boxes"][1] == {"x": 2, "y": 3, "w": 5, "h": 6, "kind": "shortcut", "what": "marker"}

    # reload: the same film comes first (one label of four marked), with the mark
    page.reload()
    open_review(page)
    assert film_id(page) == first
    row = page.locator(f"#review-marks tr[data-label='{label}']")
    row.wait_for()
    text = row.inner_text()
    assert "agree" in text and "shortcut" in text and "evidence at x" in text and "shortcut (marker)" in text
    assert "agree · heatmap shortcut · 2 boxes" in page.locator(f"#review-probs tr[data-label='{label}']").inner_text()
    # choosing the marked label again shows its verdicts and boxes, ready to change
    page.locator("#review-label").get_by_label(label).check()
    page.wait_for_function("() => document.querySelectorAll('#review-boxes li').length == 2")
    assert page.locator("#review-call input[value='agree']").is_checked()
    page.screenshot(path=str(artefacts() / "review_after_reload.png"), full_page=True)
