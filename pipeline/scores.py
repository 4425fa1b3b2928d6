"""One cycle's scores: which figures there are, which of them each output shows, and how the saliency
sanity checks read as lines.

`CycleScores` is the one place that spells a score key. summary.json's per-cycle entries, metrics.json
(what `dvc metrics show/diff` compare), the report's table and trends, the policy comparison and the
viewer's model card take their keys from it; dvc.yaml's trend plot lists `CycleScores.PLOTTED`
(tests/test_scores.py keeps the two equal). The lines of `sanity_lines` are the one rendering of
reports/sanity.json: `make run` prints them, the report and the model card show them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from pipeline.metrics.sanity import SANITY_MAX


@dataclass(frozen=True)
class CycleScores:
    """One evaluated cycle's headline figures, measured on unmodified test images (README "Reports"
    says what each means); None where a dataset cannot give one. The field order is summary.json's."""

    cycle: int
    auroc_macro: float | None = None
    accuracy: float | None = None
    f1: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    cam_in_anatomy: float | None = None
    pointing_game: float | None = None
    iou: float | None = None
    accuracy_shifted: float | None = None
    shortcut_gap: float | None = None
    faithfulness: float | None = None
    sanity_rank_corr: float | None = None
    auroc_shifted: float | None = None      # metrics.json and trends.csv, not summary.json
    marker_pointing: float | None = None    # with the shortcut audit on (pipeline/audit.py)
    cam_on_marker: float | None = None

    # summary.json's per-cycle figures, in that order (tests and readers rely on it)
    SUMMARY: ClassVar[tuple[str, ...]] = ("cycle", "auroc_macro", "accuracy", "f1", "sensitivity", "specificity",
                                          "cam_in_anatomy", "pointing_game", "iou", "accuracy_shifted",
                                          "shortcut_gap", "faithfulness", "sanity_rank_corr")
    # the classification figures on test, and where the model looks (pipeline/evaluation.py's steps)
    CLASSIFICATION: ClassVar[tuple[str, ...]] = ("auroc_macro", "accuracy", "f1", "sensitivity", "specificity")
    LOCALISATION: ClassVar[tuple[str, ...]] = ("cam_in_anatomy", "pointing_game", "iou")
    # where the audit label's heatmaps look on marked films; only with the audit on
    AUDIT: ClassVar[tuple[str, ...]] = ("marker_pointing", "cam_on_marker")
    # the per-cycle table (`make run`, the report) and the trends figure
    TABLE: ClassVar[tuple[str, ...]] = ("auroc_macro", "accuracy", "accuracy_shifted", "shortcut_gap",
                                        "pointing_game", "cam_in_anatomy", "iou", "faithfulness",
                                        "sanity_rank_corr")
    # reports/trends.csv's columns
    TRENDS: ClassVar[tuple[str, ...]] = ("cycle", *TABLE, "auroc_shifted")
    # the scores dvc.yaml's "scores across cycles" plot draws from trends.csv (all on a 0-1 scale)
    PLOTTED: ClassVar[tuple[str, ...]] = tuple(k for k in TABLE if k != "shortcut_gap")
    # the model card's test metrics
    CARD: ClassVar[tuple[str, ...]] = ("auroc_macro", "accuracy", "f1", "sensitivity", "specificity",
                                       "accuracy_shifted", "shortcut_gap", "cam_in_anatomy", "pointing_game",
                                       "iou", "faithfulness", "sanity_rank_corr")
    # the enhancement-policy comparison's panels
    POLICY: ClassVar[tuple[str, ...]] = ("pointing_game", "cam_in_anatomy", "accuracy_shifted", "auroc_macro")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, scores: dict) -> CycleScores:
        """The headline figures of a scores.json or metrics.json dict (missing ones None)."""
        return cls(**{k: scores.get(k) for k in cls.keys()})

    def get(self, key: str):
        return getattr(self, key)

    def headline(self) -> dict:
        """metrics.json: the summary figures and auroc_shifted; the audit's figures only where measured."""
        out = {k: self.get(k) for k in (*self.SUMMARY, "auroc_shifted")}
        return out | {k: self.get(k) for k in self.AUDIT if self.get(k) is not None}

    def summary_entry(self, audit_on: bool) -> dict:
        """summary.json's entry for the cycle, without its per-label figures."""
        return {k: self.get(k) for k in (*self.SUMMARY, *(self.AUDIT if audit_on else ()))}

    @property
    def sanity_passed(self) -> bool | None:
        """The cascading-randomisation check of this cycle's own evaluation (None: not measured)."""
        return None if self.sanity_rank_corr is None else self.sanity_rank_corr < SANITY_MAX


# reports/sanity.json's two checks, in the order they are shown: (key, name, the key of its figure)
SANITY_CHECKS = (("cascading_randomization", "cascading randomisation", "final_rank_corr"),
                 ("label_permutation", "label permutation", "rank_corr"))


def verdict(passed: bool | None) -> str:
    """'pass', 'FAIL' or 'not run': the one wording of a check's outcome."""
    return {True: "pass", False: "FAIL", None: "not run"}[passed]


def sanity_line(key: str, check: dict, max_corr: float = SANITY_MAX) -> str:
    """One check of reports/sanity.json (`key` one of SANITY_CHECKS) as one line: its cycle, rank
    correlation, verdict, for label permutation the twin's val loss against the label rates', and why
    it failed."""
    name, figure = next((n, f) for k, n, f in SANITY_CHECKS if k == key)
    rho = check.get(figure)
    detail = "" if rho is None else f"rank corr {rho:.3f} (passes below {max_corr}): "
    extra = (f", twin trained {check['epochs']} epochs on permuted labels: val loss {check['twin_val_loss']:.3f} "
             f"(label rates alone {check['prevalence_val_loss']:.3f})"
             if key == "label_permutation" and check.get("twin_val_loss") is not None
             and check.get("prevalence_val_loss") is not None else "")
    reason = f" — {check['reason']}" if check.get("reason") else ""
    return f"saliency sanity, {name} (cycle {check.get('cycle')}): {detail}{verdict(check.get('passed'))}{extra}{reason}"


def sanity_lines(sanity: dict | None) -> list[str]:
    """One line per check of reports/sanity.json (printed by `make run`, shown in the report)."""
    if not sanity:
        return ["saliency sanity checks: not run (reports/sanity.json missing)"]
    return [sanity_line(key, sanity.get(key) or {}, sanity["max"]) for key, _, _ in SANITY_CHECKS]
