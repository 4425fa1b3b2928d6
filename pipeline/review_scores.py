"""What the clinicians' marks say about every cycle (reports/review.json, stage `review_scores`).

- Evidence boxes are localisation ground truth for datasets that ship none (Kermany, CheXpert):
  `pointing_game_reviewed` and `iou_reviewed` per cycle, each cycle's heatmaps on the reviewed films
  scored against them as evaluate scores the source's own boxes (pipeline.metrics.localization).
- Model vs reviewers: a mark's call verdict (agree / disagree) judges the call of the model the
  reviewer saw (its sha256), which gives a reviewed truth for that (film, label); each cycle's own
  calls are compared with it (agreement and Cohen's kappa).
- Reviewers vs each other: Cohen's kappa of their reviewed truths and of their heatmap verdicts,
  over the (film, label) pairs both marked, per pair of reviewers with at least MIN_OVERLAP in common.

Heatmaps are the cycles' own Grad-CAMs in fp32 (pipeline/cam/all_labels.py) on the prepared films.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import cohen_kappa_score

from pipeline.cam.all_labels import AllLabelCAM
from pipeline.cam.maps import resize
from pipeline.config import Params, Paths
from pipeline.data.dataset import iterate_batches, predict
from pipeline.data.store import ArrayStore
from pipeline.feedback import boxes_mask, evidence_boxes, load_feedback
from pipeline.metrics.localization import cam_iou, pointing_game_hit

log = logging.getLogger(__name__)

MIN_OVERLAP = 2  # (film, label) pairs two reviewers must share before their kappa means anything


def _kappa(a: list, b: list) -> float | None:
    """Cohen's kappa; None where it is undefined (one category only on both sides)."""
    if len(a) < MIN_OVERLAP or len(set(a) | set(b)) < 2:
        return None
    k = cohen_kappa_score(a, b)
    return None if np.isnan(k) else float(k)


def reviewed_truths(marks: pd.DataFrame, calls_by_sha: dict[str, dict[tuple[str, str], int]]) -> pd.DataFrame:
    """One row per mark whose model is known: (image_id, label, reviewer, truth, heatmap). truth is the
    reviewed model's call when the reviewer agreed, the other call when not."""
    rows = []
    for m in marks.itertuples(index=False):
        call = calls_by_sha.get(m.model_sha256, {}).get((m.image_id, m.label))
        if call is None or m.call not in ("agree", "disagree"):
            continue
        rows.append({"image_id": m.image_id, "label": m.label, "reviewer": m.reviewer,
                     "truth": call if m.call == "agree" else 1 - call, "heatmap": m.heatmap})
    return pd.DataFrame(rows, columns=["image_id", "label", "reviewer", "truth", "heatmap"])


def between_reviewers(truths: pd.DataFrame) -> dict:
    """Pairwise kappa over shared (film, label) pairs, on the reviewed truth and on the heatmap verdict."""
    pairs = []
    by_reviewer = {r: g.set_index(["image_id", "label"]) for r, g in truths.groupby("reviewer")}
    for a, b in itertools.combinations(sorted(by_reviewer), 2):
        shared = by_reviewer[a].index.intersection(by_reviewer[b].index)
        if len(shared) < MIN_OVERLAP:
            continue
        ga, gb = by_reviewer[a].loc[shared], by_reviewer[b].loc[shared]
        pairs.append({"reviewers": [a, b], "n_shared": int(len(shared)),
                      "kappa_call": _kappa(ga["truth"].tolist(), gb["truth"].tolist()),
                      "kappa_heatmap": _kappa(ga["heatmap"].astype(str).tolist(), gb["heatmap"].astype(str).tolist())})
    values = [p["kappa_call"] for p in pairs if p["kappa_call"] is not None]
    return {"n_reviewers": len(by_reviewer), "pairs": pairs,
            "mean_kappa_call": float(np.mean(values)) if values else None}


def _cycle_scores(model, arch: str, params: Params, images: ArrayStore, rows: np.ndarray, ids: list[str],
                  labels: list[str], calls: dict[tuple[str, str], int], evidence: dict, truths: pd.DataFrame) -> dict:
    """One cycle: localisation against the evidence boxes, agreement of its calls with the reviewed truths."""
    hits, ious = [], []
    if evidence and len(rows):
        cam = AllLabelCAM(model, arch, params.cam.method)
        size = images.item_shape[-1]
        maps = resize(torch.cat([cam(x).cpu() for x, _, _ in iterate_batches(images, rows, None, 32)]), size).numpy()
        pos = {iid: i for i, iid in enumerate(ids)}
        for (iid, label), boxes in evidence.items():
            if iid in pos and label in labels:
                target = boxes_mask(boxes, size)
                heat = maps[pos[iid], labels.index(label)]
                hits.append(float(pointing_game_hit(heat, target, params.evaluate.pointing_tolerance_px)))
                ious.append(cam_iou(heat, target))
    model_calls = [calls[(t.image_id, t.label)] for t in truths.itertuples(index=False)]
    truth = truths["truth"].tolist()
    return {"pointing_game_reviewed": float(np.mean(hits)) if hits else None,
            "iou_reviewed": float(np.mean(ious)) if ious else None, "n_evidence_boxes": len(hits),
            "agreement_with_reviewers": float(np.mean(np.equal(model_calls, truth))) if truth else None,
            "kappa_with_reviewers": _kappa(model_calls, truth), "n_reviewed_calls": len(truth)}


def review_scores(params: Params, paths: Paths, cycles: list[dict], models: dict[str, torch.nn.Module],
                  arch: str) -> dict:
    """reports/review.json: per cycle the reviewed localisation and agreement, and the reviewers' kappa.

    `cycles`: the evaluated cycles' scores (pipeline.cycle_control.load_cycles); `models`: their checkpoints,
    {"c0": ...} (pipeline.models.checkpoint.cycle_models checks each is the one its cycle evaluated)."""
    marks = load_feedback(paths)
    out: dict = {"n_marks": int(len(marks)), "n_reviewers": int(marks["reviewer"].nunique()) if len(marks) else 0,
                 "cycles": [], "between_reviewers": None}
    if not len(marks):
        out["cycles"] = [{"cycle": c["cycle"], "pointing_game_reviewed": None, "iou_reviewed": None,
                          "n_evidence_boxes": 0, "agreement_with_reviewers": None, "kappa_with_reviewers": None,
                          "n_reviewed_calls": 0} for c in cycles]
        return out
    manifest = pd.read_parquet(paths.manifest)
    pos_of = {iid: i for i, iid in enumerate(manifest["image_id"].astype(str))}
    ids = sorted({str(i) for i in marks["image_id"] if str(i) in pos_of})
    rows = np.asarray([pos_of[i] for i in ids], dtype=np.int64)
    out["n_unknown_films"] = int(len(set(marks["image_id"].astype(str)) - set(ids)))
    images = ArrayStore(paths.images)
    labels = cycles[0]["labels"]
    evidence = evidence_boxes(marks)
    per_cycle, calls = [], {}
    for c in cycles:  # calls first: a mark's truth needs the call of the model its reviewer saw
        thresholds = np.asarray(c["model"]["thresholds"], dtype=np.float64)
        probs = predict(models[f"c{c['cycle']}"], images, rows) if len(rows) else np.zeros((0, len(labels)))
        calls[c["cycle"]] = {(iid, lab): int(probs[i, k] >= thresholds[k])
                             for i, iid in enumerate(ids) for k, lab in enumerate(labels)}
    truths = reviewed_truths(marks, {c["model"]["sha256"]: calls[c["cycle"]] for c in cycles})
    out["n_marks_on_other_models"] = int(len(marks) - len(truths))
    for c in cycles:
        scores = _cycle_scores(models[f"c{c['cycle']}"], arch, params, images, rows, ids, labels, calls[c["cycle"]],
                               evidence, truths)
        per_cycle.append({"cycle": c["cycle"], **scores})
        log.info("cycle %d vs reviewers: pointing (reviewed boxes) %s, agreement %s", c["cycle"],
                 scores["pointing_game_reviewed"], scores["agreement_with_reviewers"])
    out["cycles"] = per_cycle
    out["between_reviewers"] = between_reviewers(truths)
    return out
