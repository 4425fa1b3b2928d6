"""Page helpers the browser tests share (the `browser` fixture is in conftest.py). Screenshots go to
tmp/test-artifacts (git-ignored) or $CXR_TEST_ARTIFACTS."""
from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import ROOT
from tests.viewer_support import PASSWORD, USER


def artefacts() -> Path:
    path = Path(os.environ.get("CXR_TEST_ARTIFACTS", ROOT / "tmp" / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url + "/")
    return context, page


def login(page, password: str = PASSWORD) -> None:
    page.get_by_label("username").fill(USER)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def title_is(page, label: str) -> None:
    page.wait_for_function("(l) => { const t = document.querySelector('#heatmap-title'); "
                           "return t && t.innerText.includes(l); }", arg=label)
