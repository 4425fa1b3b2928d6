"""The Python API on the session's tiny trained project (tests/viewer_support.py trained_project):
`explain` gives the served model's own probabilities with every label's heatmap and anatomy share,
`load_cycle` what the pipeline wrote, `run_cycle` brings a cycle back with `dvc repro`; the example
script and `cxr-refine repro` run against the same project."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import Cycle, Explanation, explain, load_cycle, run_cycle
from pipeline.api import ImageError, NoModel
from pipeline.data.transforms import NORMALISATION, to_model_input
from pipeline.viewer.examples import HERE as FILMS
from tests.conftest import ROOT
from tests.viewer_support import trained_project

FILM = FILMS / "phantom_cardiomegaly.png"


@pytest.fixture(scope="module")
def project() -> Path:
    return trained_project()


@pytest.fixture(scope="module")
def project_copy(project, tmp_path_factory) -> Path:
    """A copy to change (the shared project is read-only for its users)."""
    dest = tmp_path_factory.mktemp("api") / "project"
    shutil.copytree(project, dest, symlinks=True)
    return dest


def served(project: Path) -> dict:
    return json.loads((project / "models" / "latest.json").read_text())


def test_explain_is_the_served_models_own_answer_with_every_labels_heatmap(project):
    e = explain(FILM, root=project)
    assert isinstance(e, Explanation) and e.cycle == served(project)["cycle"]
    model = load_cycle(project, e.cycle)
    labels = model.meta["labels"]
    assert list(e.probabilities) == list(e.heatmaps) == list(e.anatomy_shares) == labels
    size = int(model.meta["image_size"])
    assert e.image.shape == (size, size) and e.image.dtype == np.uint8
    # the same probabilities as the checkpoint's plain forward pass on the film as it was prepared
    with torch.no_grad():
        x = to_model_input(e.image[None], model.meta.get("normalisation", NORMALISATION))
        expected = torch.sigmoid(model.model(x))[0].numpy()
    np.testing.assert_allclose([e.probabilities[k] for k in labels], expected, atol=1e-5)
    assert e.thresholds == dict(zip(labels, map(float, model.meta["thresholds"])))
    for label in labels:
        cam = e.heatmaps[label]
        assert cam.shape == (size, size) and cam.dtype == np.float32 and 0 <= cam.min() <= cam.max() <= 1
        share = e.anatomy_shares[label]
        assert share is None or 0 <= share <= 1
    assert any(s is not None for s in e.anatomy_shares.values())   # the project has a U-Net
    assert e.anatomy is not None and e.anatomy.shape == (size, size)
    assert e.findings == sorted([k for k in labels if e.probabilities[k] >= e.thresholds[k]],
                                key=lambda k: -e.probabilities[k])
    assert e.baseline is not None and e.baseline.cycle == 0 and e.baseline.baseline is None
    assert e.baseline.image is e.image


def test_explain_takes_bytes_and_can_leave_cycle_0_out(project):
    by_path = explain(FILM, root=project)
    by_bytes = explain(FILM.read_bytes(), root=project, baseline=False)
    assert by_bytes.baseline is None and by_bytes.probabilities == by_path.probabilities
    dicom = explain(FILMS / "phantom_pneumonia.dcm", root=project)
    assert set(dicom.probabilities) == set(by_path.probabilities)


def test_explain_says_why_it_cannot(project, tmp_path):
    with pytest.raises(ImageError):
        explain(b"not an image at all", root=project)
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    with pytest.raises(NoModel, match="make run"):
        explain(FILM, root=tmp_path)


def test_load_cycle_returns_what_the_pipeline_wrote(project):
    c = load_cycle(project, 1)
    assert isinstance(c, Cycle) and c.cycle == 1
    assert c.scores == json.loads((project / "reports" / "cycles" / "c1" / "scores.json").read_text())
    assert c.meta["cycle"] == 1 and not c.model.training
    with pytest.raises(FileNotFoundError, match="cycle 7 has not been evaluated"):
        load_cycle(project, 7)


def test_run_cycle_reproduces_a_missing_evaluation(project_copy):
    scores = project_copy / "reports" / "cycles" / "c1" / "scores.json"
    before = json.loads(scores.read_text())
    scores.unlink()
    c = run_cycle(project_copy, 1)
    assert scores.is_file() and c.scores == json.loads(scores.read_text())
    assert {k: c.scores[k] for k in ("auroc_macro", "cam_in_anatomy", "shortcut_gap")} == \
        {k: before[k] for k in ("auroc_macro", "cam_in_anatomy", "shortcut_gap")}
    with pytest.raises(ValueError, match="cycle 9 is not configured"):
        run_cycle(project_copy, 9)


def test_the_example_script_explains_a_film(project, tmp_path):
    out = tmp_path / "heatmaps.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "explain_a_film.py"), "--project", str(project),
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = load_cycle(project, served(project)["cycle"]).meta["labels"]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{FILM.name}: cycle {served(project)['cycle']} (test AUROC ")
    assert sorted(line.split()[0] for line in lines[1:1 + len(labels)]) == sorted(k.split()[0] for k in labels)
    picture = cv2.imread(str(out))
    assert picture.shape == (2 * 160, len(labels) * 160, 3)   # the served model's row and cycle 0's


def test_the_command_reproduces_a_project_and_prints_the_table(project_copy):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "repro"], cwd=project_copy, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dataset: phantom" in proc.stdout and "auroc_macro" in proc.stdout   # pipeline.report's table
