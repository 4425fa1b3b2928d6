"""The model card: what is served, what it was trained on, how it scored, and what it is not for."""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import yaml

from pipeline.audit import audit_note
from pipeline.config import Paths
from pipeline.io import read_json
from pipeline.metrics.sanity import SANITY_MAX
from pipeline.scores import CycleScores, sanity_line
from pipeline.viewer.shortcut_warning import RULE as WARNING_RULE

log = logging.getLogger(__name__)

NOTICE = ("Research tool, not a medical device: not for diagnosis or treatment decisions. "
          "A heatmap shows where the model's evidence lies; it is not a lesion outline.")
INTENDED_USE = ("Exploring what a chest X-ray classifier trained by this pipeline predicts on frontal "
                "radiographs, and where it looks, before and after shortcut-decorrelating refinement cycles.")
LIMITATIONS = [
    "Trained on the data named below only (the built-in phantom is synthetic): predictions on other "
    "hospitals' films, lateral views or children are unvalidated.",
    "Probabilities are uncalibrated model scores; the operating threshold per label was chosen on the "
    "validation split to balance sensitivity and specificity.",
    "Grad-CAM heatmaps are coarse (the target layer's grid, upsampled) and can look plausible for a wrong reason.",
    "The anatomy masks come from a U-Net that can fail on unusual films; the in-anatomy share inherits its errors.",
    "Labels a dataset does not provide are not predicted meaningfully, whatever the score.",
]


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def dvc_output_md5(root: Path, out_path: Path) -> str | None:
    """The md5 dvc.lock records for an output under root (e.g. models/c2): the DVC revision of that artefact."""
    lock, key = Paths(root).dvc_lock, Path(out_path).relative_to(root).as_posix()
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == key:
                return out.get("md5")
    return None


def label_permutation_entry(root: Path, cycle: int) -> dict | None:
    """The label-permutation sanity check of `cycle` from reports/sanity.json (None where it was not run).

    `passed` is False when the served model's heatmaps correlate >= SANITY_MAX with those of a twin
    trained on permuted labels, or when no heatmap pair could be compared.
    """
    path = Paths(root).sanity
    if not path.is_file():
        return None
    try:
        lp = read_json(path).get("label_permutation") or {}
    except (OSError, ValueError, AttributeError):
        log.warning("reports/sanity.json is unreadable; the label-permutation check is left out of the card")
        return None
    if lp.get("skipped") or "by_cycle" not in lp:
        return None
    if f"c{cycle}" not in lp["by_cycle"]:
        return None  # the check ran before this cycle was evaluated
    rho = lp["by_cycle"][f"c{cycle}"]
    reason = None
    if rho is None:
        reason = f"no informative heatmap pair at cycle {cycle}"
    elif rho >= SANITY_MAX:
        reason = f"rank correlation {rho:.3f} >= {SANITY_MAX} at cycle {cycle}"
    return {"cycle": cycle, "rank_corr": rho, "passed": reason is None, "reason": reason, "max": SANITY_MAX,
            "epochs": lp.get("epochs"), "seed": lp.get("seed"), "twin_val_auroc": lp.get("twin_val_auroc"),
            "twin_val_loss": lp.get("twin_val_loss"), "prevalence_val_loss": lp.get("prevalence_val_loss")}


def mask_source(seg: dict | None) -> str | None:
    """Where the anatomy U-Net learned its masks, and how well it segments films it never saw."""
    if not seg:
        return None
    held = seg.get("held_out") or seg.get("val") or {}
    dice = ", ".join(f"{s} Dice {held[s]['dice']:.3f}" for s in ("lungs", "heart")
                     if isinstance(held.get(s), dict) and held[s].get("dice") is not None)
    return (f"U-Net trained on {seg.get('n_train')} films with masks from {', '.join(seg.get('sources') or ['?'])}"
            + (f"; held-out {dice}" if dice else ""))


def model_card(root: Path, info: dict, meta: dict, sha256: str, baseline_meta: dict | None) -> dict:
    """JSON-ready card for the served model (cycle metrics from reports/cycles/cK/metrics.json)."""
    cycle, paths = int(meta.get("cycle", 0)), Paths(root)
    metrics_path = paths.cycle_metrics(cycle)
    metrics = read_json(metrics_path) if metrics_path.is_file() else (info.get("metrics") or {})
    base_path = paths.cycle_metrics(0)
    base_metrics = read_json(base_path) if base_path.is_file() else None
    sanity_passed = CycleScores.of(metrics).sanity_passed
    permutation = label_permutation_entry(root, cycle)
    summary_path = paths.summary
    summary = read_json(summary_path) if summary_path.is_file() else {}
    dataset = summary.get("dataset") or meta.get("source")
    return {
        "cycle": cycle,
        "arch": meta.get("arch"),
        "labels": meta.get("labels"),
        "image_size": meta.get("image_size"),
        "checkpoint_sha256": sha256,
        "data_source": meta.get("source") or dataset,
        "data_hash": meta.get("data_hash"),
        "enhance_policy": meta.get("enhance_policy"),
        "selected_on": meta.get("selected_on"),
        "git_revision": git_revision(root),
        "dvc_md5": dvc_output_md5(root, paths.model(cycle)),
        "stop_reason": info.get("stop_reason"),
        "baseline_cycle": baseline_meta.get("cycle") if baseline_meta else None,
        "test_metrics": {k: metrics.get(k) for k in CycleScores.CARD},
        "baseline_test_metrics": {k: base_metrics.get(k) for k in CycleScores.CARD} if base_metrics else None,
        "sanity_flag": None if sanity_passed is None else not sanity_passed,
        "sanity_max": SANITY_MAX,
        "label_permutation": permutation,
        "label_permutation_flag": None if permutation is None else permutation["passed"] is False,
        "mask_source": mask_source(summary.get("segmentation")),
        "audit": audit_note(summary.get("audit")),
        "shortcut_warning": WARNING_RULE,   # the viewer's ⚠ (pipeline/viewer/shortcut_warning.py)
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "notice": NOTICE,
    }


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def card_markdown(card: dict) -> str:
    rows = "\n".join(f"| {k} | {_fmt(card['test_metrics'].get(k))} | "
                     f"{_fmt((card['baseline_test_metrics'] or {}).get(k))} |" for k in CycleScores.CARD)
    sanity = ""
    if card["sanity_flag"]:
        sanity = (f"\n\n**⚠ Saliency sanity check failed**: heatmaps of a randomised model still correlate "
                  f"ρ = {card['test_metrics']['sanity_rank_corr']:.2f} (≥ {card['sanity_max']}) with this model's; "
                  "treat the heatmaps with extra caution.")
    lp = card.get("label_permutation")
    if lp is not None:
        sanity += f"\n\n{sanity_line('label_permutation', lp, lp['max'])}"
    if card.get("label_permutation_flag"):
        figure = ("no heatmap pair could be compared" if lp["rank_corr"] is None else
                  f"they still correlate ρ = {lp['rank_corr']:.2f} (≥ {lp['max']}) with this model's")
        sanity += (f"\n\n**⚠ Label-permutation sanity check failed**: a twin trained on randomly permuted labels "
                   f"gives heatmaps like this model's — {figure}; the heatmaps may reflect the images and the "
                   "architecture more than what the model learned from the labels.")
    lims = "\n".join(f"- {x}" for x in card["limitations"])
    return f"""### Model card

**{card['notice']}**

| field | value |
|---|---|
| served model | cycle {card['cycle']} ({_fmt(card['arch'])}, {_fmt(card['image_size'])} px), beside cycle {_fmt(card['baseline_cycle'])} |
| training data | {_fmt(card['data_source'])} (data hash `{_fmt(card['data_hash'])}`), enhancement policy {_fmt(card['enhance_policy'])} |
| anatomy masks | {_fmt(card.get('mask_source'))} |
| shortcut audit | {_fmt(card.get('audit') or 'off')} |
| shortcut warning | {_fmt(card.get('shortcut_warning'))} |
| revision | git `{_fmt(card['git_revision'])}`, DVC md5 of models/c{card['cycle']} `{_fmt(card['dvc_md5'])}` |
| checkpoint sha256 | `{(card['checkpoint_sha256'] or '')[:16]}…` |
| why this cycle | {_fmt(card['stop_reason'])} |

Test metrics (unmodified test images):

| metric | served (cycle {card['cycle']}) | cycle 0 |
|---|---|---|
{rows}
{sanity}

**Intended use.** {card['intended_use']}

**Limitations.**
{lims}
"""
