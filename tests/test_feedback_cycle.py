"""Clinicians' marks in the cycle: after a review, `dvc repro` re-runs the enhancement onward and nothing
before it; shortcut boxes are decorrelated and penalised (train.rrr_weight); evidence boxes score every
cycle's heatmaps (reports/review.json)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pipeline.enhance import make_plan
from pipeline.training import RightReasons


def _dvc(project, *args):
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A copy of the session's tiny project, reviewed by the simulated reviewer, then `dvc repro`."""
    from pipeline.simulated_reviewer import mark_lung_fields, mark_markers
    from tests.viewer_support import serve_cycle, trained_project

    p = tmp_path_factory.mktemp("reviewed") / "p"
    shutil.copytree(trained_project(), p, symlinks=True)
    serve_cycle(p, 0)  # the reviewer sees cycle 0, which the review does not retrain: its calls stay known
    before = json.loads((p / "reports" / "summary.json").read_text())
    n_markers = mark_markers(str(p), n=10)
    n_lungs = mark_lung_fields(str(p), n=8, label="Pneumonia")
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["train"]["rrr_weight"] = 0.5
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _dvc(p, "repro")
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    return p, ran, before, n_markers, n_lungs


def test_a_review_reruns_the_enhancement_onward_and_nothing_before(reviewed):
    p, ran, _, n_markers, n_lungs = reviewed
    assert n_markers == 10 and n_lungs > 0
    assert ran == {"enhance@c1", "train@c1", "evaluate@c1", "cam@c2", "enhance@c2", "train@c2", "evaluate@c2",
                   "sanity", "review_scores", "report"}, ran
    assert json.loads(_dvc(p, "status", "--json").stdout) == {}


def test_shortcut_boxes_are_decorrelated_and_penalised(reviewed):
    p, *_ = reviewed
    stats = json.loads((p / "reports" / "enhance" / "c1" / "stats.json").read_text())
    assert stats["reviewed_shortcut_boxes"] >= 10 and stats["reviewed_fraction"] > 0
    meta = json.loads((p / "models" / "c1" / "model.json").read_text())
    assert meta["rrr_weight"] == 0.5


def test_evidence_boxes_score_every_cycle(reviewed):
    p, _, before, _, n_lungs = reviewed
    review = json.loads((p / "reports" / "review.json").read_text())
    assert review["n_marks"] == 10 + n_lungs and review["n_reviewers"] == 1
    assert [c["cycle"] for c in review["cycles"]] == [0, 1, 2]
    for c in review["cycles"]:
        assert c["n_evidence_boxes"] == n_lungs
        assert 0.0 <= c["pointing_game_reviewed"] <= 1.0 and 0.0 <= c["iou_reviewed"] <= 1.0
        assert c["n_reviewed_calls"] == 10 + n_lungs and 0.0 <= c["agreement_with_reviewers"] <= 1.0
    assert review["n_marks_on_other_models"] == 0
    assert review["cycles"][0]["agreement_with_reviewers"] == 1.0  # every mark agreed with cycle 0's calls
    # cycle 0 was not retrained: its reviewed scores use the same weights as before the review
    summary = json.loads((p / "reports" / "summary.json").read_text())
    assert summary["cycles"][0]["auroc_macro"] == before["cycles"][0]["auroc_macro"]


def test_the_reviewed_region_joins_the_hot_region_even_where_cams_never_looked():
    class Store:  # the CAM and mask stores make_plan reads: zero CAMs, no anatomy
        def __init__(self, arr):
            self.arr, self.item_shape = arr, arr.shape[1:]

        def __len__(self):
            return len(self.arr)

        def read(self, idx):
            return self.arr[idx]

        def iter_batches(self, n):
            yield np.arange(len(self.arr)), self.arr

    from pipeline.config import EnhanceParams

    cams = Store(np.zeros((4, 1, 4, 4), np.float16))
    masks = Store(np.zeros((4, 16, 16), np.uint8))
    reviewed = np.zeros((16, 16), bool)
    reviewed[:3, :3] = True
    plan = make_plan(EnhanceParams(), cams, masks, np.arange(4), ["Pneumonia"], reviewed)
    assert plan.hot is not None and plan.hot[:3, :3].all() and plan.hot.sum() == 9
    assert plan.stats["reviewed_fraction"] == pytest.approx(9 / 256)
    assert make_plan(EnhanceParams(), cams, masks, np.arange(4), ["Pneumonia"]).hot is None


def test_right_reasons_penalises_only_gradient_inside_the_region():
    torch.manual_seed(0)
    region = np.zeros((8, 8), bool)
    region[:2, :2] = True
    w = torch.zeros(1, 3, 8, 8)
    w[..., :2, :2] = 1.0  # a "model" that reads only the marked corner ...
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    inside = RightReasons(1.0, region).penalty((x * w).sum(dim=(1, 2, 3)).unsqueeze(1), x)
    x2 = torch.rand(4, 3, 8, 8, requires_grad=True)
    outside = RightReasons(1.0, region).penalty((x2 * (1 - w)).sum(dim=(1, 2, 3)).unsqueeze(1), x2)
    assert inside > 0 and outside == 0  # ... pays; one that reads elsewhere does not
    inside.backward()  # differentiable: it trains the weights


def test_the_report_shows_the_review(reviewed):
    p, *_ = reviewed
    summary = json.loads((p / "reports" / "summary.json").read_text())
    assert [c["cycle"] for c in summary["review"]["cycles"]] == [0, 1, 2]
    html = (p / "reports" / "index.html").read_text()
    assert "Clinician review" in html and "pointing_game_reviewed" in html
