"""Every real-dataset adapter, on a fixture in that dataset's own layout, through one whole tiny
refinement cycle with `dvc repro` (the U-Net falls back to phantom masks: the fixtures ship none).

`make test` runs NIH (a source with boxes, so the pointing game); the other four are `slow` (`make
test-all`): each whole cycle costs about 100 s, their adapters' contracts, splits and quarantine are
tested in tests/test_sources.py, and Kermany's adapter also runs the whole cycle on the real films in
tests/test_real_data.py."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pandas as pd
import pytest

from pipeline.data.labels import CANONICAL_LABELS
from pipeline.scores import CycleScores
from tests.conftest import tiny_params
from tests.helpers import make_project

SOURCES = ("kermany", "cardiomegaly", "chexpert", "rsna", "nih")
IN_MAKE_TEST = {"nih"}
HAS_BOXES = {"rsna", "nih"}


@pytest.mark.parametrize("source", [s if s in IN_MAKE_TEST else pytest.param(s, marks=pytest.mark.slow)
                                    for s in SOURCES])
def test_one_cycle_on_each_source(source, tmp_path):
    fixture = importlib.import_module(f"tests.fixtures.{source}")
    data_root = tmp_path / "dataset"
    fixture.build(data_root)
    params = tiny_params()
    params["data"].update(source=source, root=str(data_root))
    params["segment"].update(n_train=32)
    # a few training steps on ~40 films can leave a one-label model whose Grad-CAM is zero on every
    # test positive (then the in-anatomy share is rightly undefined); EigenCAM always has a map, and
    # the Grad-CAM path is covered on the phantom
    params["cam"].update(method="eigencam")
    params["cycles"] = {"c1": {"id": 1, "prev": 0}}
    project = make_project(tmp_path / "project", params)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert summary["dataset"] == source and [c["cycle"] for c in summary["cycles"]] == [0, 1]
    assert summary["labels"] and set(summary["labels"]) <= set(CANONICAL_LABELS)
    for c in summary["cycles"]:
        assert set(CycleScores.SUMMARY) <= set(c)
        assert c["auroc_macro"] is not None and c["cam_in_anatomy"] is not None
        assert c["accuracy_shifted"] is None and c["shortcut_gap"] is None  # no planted shortcut in real data
        assert (c["pointing_game"] is not None) == (source in HAS_BOXES)
    assert summary["quarantined"] >= 1  # every fixture carries a broken file
    quarantine = pd.read_csv(project / "reports" / "quarantine.csv")
    assert len(quarantine) == summary["quarantined"] and quarantine["reason"].str.len().min() > 5
    manifest = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    assert summary["segmentation"]["sources"] == ["phantom"]
