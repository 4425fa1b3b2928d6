"""What a DVC user and a reader get from a run, on the session's tiny project (tests/viewer_support.py
trained_project): every cycle's ROC, precision-recall and calibration curves and its heatmap grid are
DVC plots, and reports/index.html shows everything when copied alone."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Paths
from pipeline.curves import AXES
from tests.viewer_support import trained_project

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def project():
    return trained_project()


@pytest.fixture(scope="module")
def cycles(project):
    return json.loads(Paths(project).summary.read_text())["cycles"]


@pytest.fixture(scope="module")
def plots(project, tmp_path_factory):
    """`dvc plots show --json` of the project (its images written outside it): {plot id: its renderers}."""
    out = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o",
                          str(tmp_path_factory.mktemp("dvc_plots"))], cwd=project, check=True,
                         capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}, timeout=300)
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]
    return shown["data"]


def test_dvc_plots_lists_every_cycles_curves_and_heatmap_grid(project, cycles, plots):
    paths = Paths(project)
    assert [c["cycle"] for c in cycles] == [0, 1, 2]
    for c in cycles:
        k = c["cycle"]
        for kind, path in (("roc", paths.cycle_roc(k)), ("pr", paths.cycle_pr(k)),
                           ("calibration", paths.cycle_calibration(k))):
            (renderer,) = plots[path.relative_to(project).as_posix()]
            assert renderer["type"] == "vega" and renderer["revisions"] == ["workspace"]
            spec, (x, y) = renderer["content"], AXES[kind]
            rows = spec["data"]["values"]
            assert {r["split"] for r in rows} == {"test", "test_shifted"}
            assert {r["label"] for r in rows} <= set(c["per_label"]) and len({r["label"] for r in rows}) > 1
            assert all(0 <= float(r[x]) <= 1 and 0 <= float(r[y]) <= 1 for r in rows)
            assert len(rows) == len(pd.read_csv(path)) and spec["title"].endswith(f"(c{k})")
            # the curves template: a line per label, a panel per split, the axes filled in
            enc = spec["spec"]["encoding"]
            assert (enc["x"]["field"], enc["y"]["field"], enc["color"]["field"], spec["facet"]["column"]["field"]) \
                == (x, y, "label", "split")
        (grid,) = plots[paths.cycle_cam_grid(k).relative_to(project).as_posix()]
        assert grid["type"] == "image" and grid["revisions"] == ["workspace"]
        assert Path(grid["url"]).read_bytes() == paths.cycle_cam_grid(k).read_bytes()


def test_the_roc_plot_is_the_curve_the_auroc_was_measured_on(project, cycles):
    """The area under each label's ROC points in roc.csv is the label's test AUROC in summary.json (the
    tiny test split has fewer points than the 200 kept, so no point was dropped)."""
    for c in cycles:
        table = pd.read_csv(Paths(project).cycle_roc(c["cycle"]))
        test = table[table["split"] == "test"]
        for label, pts in test.groupby("label", sort=False):
            assert np.trapezoid(pts["tpr"], pts["fpr"]) == pytest.approx(c["per_label"][label]["test_auroc"], abs=1e-9)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_the_report_shows_everything_when_copied_alone(project, cycles, tmp_path):
    copy = tmp_path / "index.html"
    shutil.copy(Paths(project).report_html, copy)
    page = copy.read_text()
    parser = _Tags()
    parser.feed(page)
    images = [attrs.get("src", "") for tag, attrs in parser.tags if tag == "img"]
    # trends, before/after, each cycle's heatmap grid, ROC on test and test_shifted, two confusion grids,
    # loss curves, three mask previews, and each enhancement's atlas and examples
    assert len(images) == 1 + 1 + len(cycles) + 2 + 2 + 1 + 3 + 2 * (len(cycles) - 1)
    assert all(src.startswith("data:image/png;base64,") for src in images), [s[:40] for s in images]
    assert all(base64.b64decode(src.split(",", 1)[1]).startswith(PNG) for src in images)
    # the heatmap grid DVC plots is the one the report shows
    assert all(f"base64,{base64.b64encode(Paths(project).cycle_cam_grid(c['cycle']).read_bytes()).decode()}" in page
               for c in cycles)
    # nothing else is fetched for display: no script, frame, stylesheet or CSS url(); links may stay links
    fetched = [(tag, attrs) for tag, attrs in parser.tags
               if tag in {"script", "iframe", "embed", "object", "source", "link", "video", "audio"}
               or (attrs.get("src") and tag != "img") or "background" in attrs]
    assert not fetched and "url(" not in page
