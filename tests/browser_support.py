"""Playwright driving Debian's Chromium (installed by .ci/run): the browser fixture and page helpers the
browser tests share. Screenshots go to tmp/test-artifacts (git-ignored) or $CXR_TEST_ARTIFACTS."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.viewer_support import PASSWORD, USER

CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]


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
