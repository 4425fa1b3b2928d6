"""Shared by the review-mode tests: one viewer per test session over a copy of the tiny trained project
(the review writes data/feedback/ into its project, and tests/viewer_support.trained_project is
read-only for its users), with eight REST reviewers, one browser reviewer and one viewer-role user."""
from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from pathlib import Path

from tests.viewer_support import PASSWORD, USER, start_viewer, trained_project

REVIEWERS = {f"rev{k}": f"review-password-{k}" for k in range(8)}
BROWSER_REVIEWER, BROWSER_PASSWORD = "radiologist", "browser-review-pw"
API_REVIEWER, API_PASSWORD = "reader", "reader-review-pw"   # the REST tests' own walk through the films
_cache: dict = {}


def review_project() -> Path:
    if "project" not in _cache:
        tmp = Path(tempfile.mkdtemp(prefix="cxr-review-test-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _cache["project"] = Path(shutil.copytree(trained_project(), tmp / "project", symlinks=True))
    return _cache["project"]


def review_viewer():
    """The session's review viewer (started once, stopped at exit)."""
    if "viewer" not in _cache or _cache["viewer"].proc.poll() is not None:
        reviewers = {**REVIEWERS, BROWSER_REVIEWER: BROWSER_PASSWORD, API_REVIEWER: API_PASSWORD}
        users = ",".join(f"{n}:{p}" for n, p in {USER: PASSWORD, **reviewers}.items())
        _cache["viewer"] = start_viewer(review_project(), f"review-{uuid.uuid4().hex[:6]}",
                                        extra_env={"CXR_USERS": users, "CXR_REVIEWERS": ",".join(reviewers)})
    return _cache["viewer"]
