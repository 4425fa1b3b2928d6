"""A cycle's ROC, precision-recall and calibration curves as tables DVC plots draw.

The evaluate stage writes one CSV per kind (Paths.cycle_roc, cycle_pr, cycle_calibration), one row
per point: its split, its label and the two coordinates of AXES. dvc.yaml declares each as a plot of
its stage with those axes and the template .dvc/plots/curves.json (one line per label, one panel per
split, one dash per revision), so `dvc plots show` draws every cycle's and `dvc plots diff` compares
them across commits and experiments. The report's ROC figure reads roc.csv back (`read_curves`):
the CSV is the one copy of the points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Paths
from pipeline.io import write_text
from pipeline.metrics.classification import calibration_points, pr_curve_points, roc_curve_points

# kind -> (x, y): the columns of its CSV after split and label, and the axes dvc.yaml plots
AXES = {"roc": ("fpr", "tpr"), "pr": ("recall", "precision"), "calibration": ("mean_predicted", "observed_rate")}
_POINTS = {"roc": roc_curve_points, "pr": pr_curve_points, "calibration": calibration_points}


def curve_paths(paths: Paths, cycle: int) -> dict[str, Path]:
    """Where each kind of curve of `cycle` is written."""
    return {"roc": paths.cycle_roc(cycle), "pr": paths.cycle_pr(cycle), "calibration": paths.cycle_calibration(cycle)}


def label_curves(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, dict[str, dict]]:
    """{kind: {label: {x: [...], y: [...]}}} of one split (a label with one known class has no points)."""
    return {kind: {label: points(y[:, k], probs[:, k]) for k, label in enumerate(labels)}
            for kind, points in _POINTS.items()}


def curve_table(curves: dict[str, dict], kind: str) -> pd.DataFrame:
    """One kind of curve of every split and label as rows (split, label, x, y), in curve order."""
    x, y = AXES[kind]
    parts = [pd.DataFrame({"split": split, "label": label, x: pts[x], y: pts[y]})
             for split, by_label in curves.items() for label, pts in by_label[kind].items() if pts[x]]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["split", "label", x, y])


def write_curves(paths: Paths, cycle: int, curves: dict[str, dict]) -> None:
    """`curves`: {split: label_curves(...)}; one CSV per kind (curve_paths)."""
    for kind, path in curve_paths(paths, cycle).items():
        write_text(path, curve_table(curves, kind).to_csv(index=False))


def read_curves(path: Path, kind: str, labels: list[str]) -> dict[str, dict[str, dict]]:
    """{split: {label: {x: [...], y: [...]}}} from one CSV, every label of `labels` present (empty where
    it had no curve), splits in the order written."""
    x, y = AXES[kind]
    table = pd.read_csv(path, dtype={"split": str, "label": str})
    out: dict[str, dict[str, dict]] = {}
    for split in table["split"].unique():
        rows = table[table["split"] == split]
        out[split] = {label: {x: rows.loc[rows["label"] == label, x].tolist(),
                              y: rows.loc[rows["label"] == label, y].tolist()} for label in labels}
    return out
