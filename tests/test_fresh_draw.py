"""Scoring trained cycles on a fresh phantom population (pipeline/fresh_draw.py)."""
from __future__ import annotations

import json

import pytest

from pipeline.config import Params
from pipeline.fresh_draw import draw, fresh_draw
from tests.viewer_support import trained_project


def test_every_cycle_is_scored_on_new_patients_only():
    project = trained_project()
    result = fresh_draw(project, patients=60, seed=7)
    summary = json.loads((project / "reports" / "summary.json").read_text())
    assert [c["cycle"] for c in result["cycles"]] == [c["cycle"] for c in summary["cycles"]]
    assert result["images"]["test"] > 20 and result["images"]["test_shifted"] > 20
    for c in result["cycles"]:
        assert c["test"]["n"] == result["images"]["test"]
        assert c["shortcut_gap"] == pytest.approx(c["test"]["accuracy"] - c["test_shifted"]["accuracy"])
        assert 0 <= c["test"]["accuracy"] <= 1 and set(c["test"]["per_label_accuracy"]) == set(summary["labels"])
    assert json.loads((project / "reports" / "fresh_draw.json").read_text()) == json.loads(json.dumps(result))


def test_a_fresh_draw_shares_no_patient_or_image_with_the_run():
    params = Params()
    run = draw(params.model_copy(update={"data": params.data.model_copy(update={"seed": 1})}), 40, seed=2)
    fresh = draw(params, 40, seed=3)
    a = {r.image.tobytes() for s in run.values() for r in s}
    b = {r.image.tobytes() for s in fresh.values() for r in s}
    assert a and b and not (a & b)
    with pytest.raises(ValueError, match="own data.seed"):
        fresh_draw(trained_project(), patients=10, seed=Params().data.seed)
