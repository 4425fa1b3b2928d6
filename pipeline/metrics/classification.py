"""Multi-label classification scores with unknown labels (NaN) excluded per label.

Every figure comes from scikit-learn; anything that cannot be computed on the available rows
(AUROC with one class, sensitivity with no positives, ...) is None so the result is JSON-safe
and an undefined figure is never mistaken for a bad one.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_curve, precision_score,
                             recall_score, roc_auc_score, roc_curve)

log = logging.getLogger(__name__)

SUMMARY = ("f1", "accuracy", "sensitivity", "specificity")
CALIBRATION_BINS = 10  # equal-width bins of the predicted probability for the reliability diagram


def _known(y_true_1d, y_score_1d) -> tuple[np.ndarray, np.ndarray]:
    """Rows where both the label and the score are known; labels as int 0/1."""
    y = np.asarray(y_true_1d, dtype=np.float64)
    s = np.asarray(y_score_1d, dtype=np.float64)
    keep = ~(np.isnan(y) | np.isnan(s))
    return y[keep].astype(np.int64), s[keep]


def _num(value) -> float | None:
    """Plain float, or None for NaN/None (sklearn's zero_division=nan marks undefined figures)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def choose_thresholds(y_true, y_score) -> np.ndarray:
    """(L,) operating points by Youden's J on validation data; 0.5 where J is undefined.

    Ties go to the highest threshold (first ROC point reaching the max), i.e. the more specific one.
    """
    y_true, y_score = np.asarray(y_true, dtype=np.float64), np.asarray(y_score, dtype=np.float64)
    out = np.full(y_true.shape[1], 0.5)
    for k in range(y_true.shape[1]):
        y, s = _known(y_true[:, k], y_score[:, k])
        if len(np.unique(y)) < 2:
            log.debug("label %d: one class or no data, threshold stays 0.5", k)
            continue
        fpr, tpr, thr = roc_curve(y, s)
        out[k] = float(np.clip(thr[int(np.argmax(tpr - fpr))], 0.0, 1.0))
    return out


def _label_metrics(y: np.ndarray, s: np.ndarray, threshold: float) -> dict:
    """One label's scores on its known rows; prediction is score >= threshold."""
    n, n_pos = int(len(y)), int(y.sum())
    base = {"n": n, "n_pos": n_pos, "threshold": float(threshold)}
    if n == 0:
        return {"auroc": None, **{k: None for k in (*SUMMARY, "precision")}, **base,
                "confusion": [[0, 0], [0, 0]]}
    pred = (s >= threshold).astype(np.int64)
    nan = dict(zero_division=np.nan)
    return {
        "auroc": _num(roc_auc_score(y, s)) if 0 < n_pos < n else None,
        "f1": _num(f1_score(y, pred, labels=[0, 1], **nan)),
        "accuracy": _num(accuracy_score(y, pred)),
        "sensitivity": _num(recall_score(y, pred, labels=[0, 1], **nan)),
        "specificity": _num(recall_score(y, pred, labels=[0, 1], pos_label=0, **nan)),
        "precision": _num(precision_score(y, pred, labels=[0, 1], **nan)),
        **base,
        "confusion": confusion_matrix(y, pred, labels=[0, 1]).astype(int).tolist(),
    }


def classification_metrics(y_true, y_score, thresholds, labels: list[str]) -> dict:
    """Per-label scores plus macro means over the labels where each figure is defined."""
    y_true, y_score = np.asarray(y_true, dtype=np.float64), np.asarray(y_score, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.shape[1] != len(labels) or len(thresholds) != len(labels):
        raise ValueError(f"shape mismatch: y_true {y_true.shape}, y_score {y_score.shape}, "
                         f"{len(thresholds)} thresholds, {len(labels)} labels")
    per_label = {label: _label_metrics(*_known(y_true[:, k], y_score[:, k]), thresholds[k])
                 for k, label in enumerate(labels)}
    out = {"per_label": per_label, "auroc_macro": _mean(m["auroc"] for m in per_label.values())}
    out.update({key: _mean(m[key] for m in per_label.values()) for key in SUMMARY})
    return out


def roc_curve_points(y_true_1d, y_score_1d, max_points: int = 200) -> dict:
    """ROC points for plotting, at most `max_points` (always keeping both ends); empty if one class."""
    y, s = _known(y_true_1d, y_score_1d)
    if len(np.unique(y)) < 2:
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y, s)
    fpr, tpr = _thin(max_points, fpr, tpr)
    return {"fpr": fpr, "tpr": tpr}


def _thin(max_points: int, *curves: np.ndarray) -> list[list[float]]:
    """At most `max_points` points of equally long curves, always keeping both ends."""
    if len(curves[0]) > max_points:
        keep = np.unique(np.linspace(0, len(curves[0]) - 1, max(max_points, 2)).round().astype(int))
        curves = tuple(c[keep] for c in curves)
    return [[float(v) for v in c] for c in curves]


def pr_curve_points(y_true_1d, y_score_1d, max_points: int = 200) -> dict:
    """Precision-recall points for plotting, recall ascending, at most `max_points`; empty if one class."""
    y, s = _known(y_true_1d, y_score_1d)
    if len(np.unique(y)) < 2:
        return {"recall": [], "precision": []}
    precision, recall, _ = precision_recall_curve(y, s)
    recall, precision = _thin(max_points, recall[::-1], precision[::-1])
    return {"recall": recall, "precision": precision}


def calibration_points(y_true_1d, y_score_1d, n_bins: int = CALIBRATION_BINS) -> dict:
    """The reliability diagram: per non-empty probability bin, the mean predicted probability and the
    observed positive rate; empty if one class."""
    y, s = _known(y_true_1d, y_score_1d)
    if len(np.unique(y)) < 2:
        return {"mean_predicted": [], "observed_rate": []}
    observed, predicted = calibration_curve(y, np.clip(s, 0.0, 1.0), n_bins=n_bins, strategy="uniform")
    return {"mean_predicted": [float(v) for v in predicted], "observed_rate": [float(v) for v in observed]}
