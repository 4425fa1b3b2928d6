"""CycleScores owns the score keys: the outputs keep their keys and order, nobody else lists them, and
dvc.yaml's plots mirror them; the sanity checks read the same wherever they are shown."""
from __future__ import annotations

import ast
import json

import yaml

from pipeline.curves import AXES
from pipeline.scores import CycleScores, sanity_lines
from tests.helpers import ROOT

SCANNED = ("pipeline", "flows", "benchmarks", "examples")
METRICS = ROOT / "pipeline" / "metrics"  # the metric functions name what they compute; CycleScores picks from it


def _scores(**extra) -> dict:
    base = {k: 0.5 for k in CycleScores.keys()} | {"cycle": 2, "marker_pointing": None, "cam_on_marker": None}
    return {"labels": ["a"], "per_label": {}, "sanity": {}, **base, **extra}


def test_summary_keys_lead_the_fields_in_summary_json_order():
    assert CycleScores.keys()[:len(CycleScores.SUMMARY)] == CycleScores.SUMMARY
    assert CycleScores.SUMMARY == ("cycle", "auroc_macro", "accuracy", "f1", "sensitivity", "specificity",
                                   "cam_in_anatomy", "pointing_game", "iou", "accuracy_shifted", "shortcut_gap",
                                   "faithfulness", "sanity_rank_corr")
    for view in (CycleScores.CLASSIFICATION, CycleScores.LOCALISATION, CycleScores.AUDIT, CycleScores.TABLE, CycleScores.TRENDS, CycleScores.PLOTTED, CycleScores.CARD,
                 CycleScores.POLICY):
        assert set(view) <= set(CycleScores.keys()) and len(set(view)) == len(view)


def test_headline_is_metrics_json_byte_for_byte():
    """The keys and their order of reports/cycles/cK/metrics.json before CycleScores existed."""
    without = CycleScores.of(_scores()).headline()
    assert json.dumps(without) == json.dumps({k: _scores()[k] for k in (*CycleScores.SUMMARY, "auroc_shifted")})
    audited = CycleScores.of(_scores(marker_pointing=0.25, cam_on_marker=0.125)).headline()
    assert list(audited) == [*CycleScores.SUMMARY, "auroc_shifted", "marker_pointing", "cam_on_marker"]
    assert CycleScores.of({"cycle": 1}).headline()["auroc_macro"] is None


def test_summary_entry_adds_the_audit_figures_only_with_the_audit_on():
    c = CycleScores.of(_scores(marker_pointing=0.25))
    assert list(c.summary_entry(False)) == list(CycleScores.SUMMARY)
    assert list(c.summary_entry(True)) == [*CycleScores.SUMMARY, *CycleScores.AUDIT]
    assert c.summary_entry(True)["cam_on_marker"] is None


def test_sanity_passed_follows_the_threshold():
    assert CycleScores.of(_scores(sanity_rank_corr=0.05)).sanity_passed is True
    assert CycleScores.of(_scores(sanity_rank_corr=0.2)).sanity_passed is False
    assert CycleScores.of(_scores(sanity_rank_corr=None)).sanity_passed is None


def test_sanity_lines_render_both_checks():
    sanity = {"max": 0.2, "cascading_randomization": {"cycle": 1, "final_rank_corr": 0.01, "passed": True},
              "label_permutation": {"cycle": 1, "rank_corr": None, "passed": None, "skipped": True,
                                    "reason": "not run: sanity.label_permutation is false"}}
    assert sanity_lines(sanity) == [
        "saliency sanity, cascading randomisation (cycle 1): rank corr 0.010 (passes below 0.2): pass",
        "saliency sanity, label permutation (cycle 1): not run — not run: sanity.label_permutation is false"]
    assert sanity_lines(None) == ["saliency sanity checks: not run (reports/sanity.json missing)"]


def _key_lists(source: str) -> list[tuple[int, list[str]]]:
    """Tuple/list/set literals naming three or more score keys: a hand-kept copy of a CycleScores view."""
    keys = set(CycleScores.keys())
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            named = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in keys]
            if len(named) >= 3:
                out.append((node.lineno, named))
    return out


def test_the_rule_sees_a_copied_key_list():
    assert _key_lists('KEYS = ("auroc_macro", "accuracy", "iou")')
    assert not _key_lists('KEYS = CycleScores.TABLE\nx = ("auroc_macro", "other")')


def test_no_module_lists_score_keys_but_scores_py():
    owner = ROOT / "pipeline" / "scores.py"
    found = {str(p.relative_to(ROOT)): hits for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))
             if p != owner and METRICS not in p.parents and (hits := _key_lists(p.read_text()))}
    assert not found, f"score keys listed by hand; use a CycleScores view: {found}"


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_the_trend_plot_draws_the_plotted_scores():
    (plot,) = [p["scores across cycles"] for p in _dvc_yaml()["plots"] if "scores across cycles" in p]
    assert plot["y"] == {"reports/trends.csv": list(CycleScores.PLOTTED)} and plot["x"] == "cycle"
    assert set(CycleScores.PLOTTED) <= set(CycleScores.TRENDS)


def test_the_curve_plots_use_the_columns_evaluate_writes():
    stages = _dvc_yaml()["stages"]
    for stage, key in ((stages["evaluate_baseline"], "c0"), (stages["evaluate"]["do"], "${key}")):
        plots = {next(iter(p)): next(iter(p.values())) for p in stage["plots"]}
        for kind, (x, y) in AXES.items():
            props = plots[f"reports/cycles/{key}/{kind}.csv"]
            assert (props["x"], props["y"], props["template"], props["cache"]) == (x, y, "curves", False)
        assert f"reports/cycles/{key}/cam_grid.png" in plots
    assert (ROOT / ".dvc" / "plots" / "curves.json").is_file()
