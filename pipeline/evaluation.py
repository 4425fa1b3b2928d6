"""Score one cycle's model on the *unmodified* images: accuracy and where it looks.

Thresholds come from the checkpoint (chosen on val during training), never from test.
The model runs on `compute.device`: probabilities under `compute.precision` (autocast), every CAM
and the metrics built on CAMs (localisation, ROAD, the sanity check) in fp32 (pipeline/cam/all_labels.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pipeline.audit import marker_boxes, marker_scores
from pipeline.cam.all_labels import AllLabelCAM
from pipeline.cam.maps import resize, to_storage
from pipeline.compute import CPU, Compute
from pipeline.config import Params
from pipeline.data.dataset import iterate_batches, predict
from pipeline.data.labels import anatomy_of
from pipeline.data.manifest import label_matrix, rows
from pipeline.data.record import decode_anatomy
from pipeline.data.store import ArrayStore
from pipeline.metrics.classification import classification_metrics, roc_curve_points
from pipeline.metrics.faithfulness import road_score
from pipeline.metrics.localization import boxes_to_mask, cam_iou, energy_share, pointing_game_hit
from pipeline.metrics.sanity import cascading_randomization

log = logging.getLogger(__name__)

# the per-cycle figures of reports/summary.json (DESIGN.md), in that order
SUMMARY_KEYS = ("cycle", "auroc_macro", "accuracy", "f1", "sensitivity", "specificity", "cam_in_anatomy",
                "pointing_game", "iou", "accuracy_shifted", "shortcut_gap", "faithfulness", "sanity_rank_corr")


# with the shortcut audit on (pipeline/audit.py): where the audit label's heatmaps look on marked films
AUDIT_KEYS = ("marker_pointing", "cam_on_marker")


def headline(scores: dict) -> dict:
    """The scores `dvc metrics show/diff` compare across cycles and experiments (metrics.json)."""
    out = {k: scores.get(k) for k in (*SUMMARY_KEYS, "auroc_shifted")}
    return out | {k: scores[k] for k in AUDIT_KEYS if scores.get(k) is not None}  # with the audit on


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def low_res_cams(model, arch: str, store: ArrayStore, idx: np.ndarray, method: str,
                 batch_size: int = 64) -> torch.Tensor:
    """All labels' CAMs (n, L, h, w) at the target layer's resolution, one pass per batch."""
    cam = AllLabelCAM(model, arch, method)
    return torch.cat([cam(x).cpu() for x, _, _ in iterate_batches(store, idx, None, batch_size)])


def localisation(cams: np.ndarray, anatomy: np.ndarray, targets: np.ndarray, image_ids: list[str],
                 boxes: pd.DataFrame, labels: list[str], tolerance_px: int,
                 plausible: np.ndarray | None = None) -> dict:
    """Energy in the label's anatomy, pointing game and IoU vs boxes, over positive (image, label) pairs.

    `plausible` (bool per image; pipeline/anatomy_checks.py): a film whose anatomy mask failed the
    checks is left out of cam_in_anatomy (a broken mask would score the heatmap against the wrong
    region) and counted in n_implausible_excluded; boxes do not depend on masks, so it still counts there.
    """
    plausible = np.ones(len(targets), bool) if plausible is None else np.asarray(plausible, bool)
    by_image = {k: g for k, g in boxes.groupby("image_id")} if len(boxes) else {}
    per_label = {}
    all_share, all_hit, all_iou = [], [], []
    for k, label in enumerate(labels):
        structure = anatomy_of(label)
        shares, hits, ious = [], [], []
        for i in np.flatnonzero(targets[:, k] == 1):
            cam = cams[i, k]
            if plausible[i]:
                shares.append(energy_share(cam, decode_anatomy(anatomy[i], structure)))
            g = by_image.get(image_ids[i])
            if g is not None:
                b = g[g["label"] == label]
                if len(b):
                    box_mask = boxes_to_mask(list(b[["x", "y", "w", "h"]].itertuples(index=False, name=None)),
                                             cam.shape)
                    hits.append(float(pointing_game_hit(cam, box_mask, tolerance_px)))
                    ious.append(cam_iou(cam, box_mask))
        n_pos = int((targets[:, k] == 1).sum())
        per_label[label] = {"cam_in_anatomy": _mean(shares), "pointing_game": _mean(hits), "iou": _mean(ious),
                            "n_positive": n_pos, "n_boxes": len(hits), "n_implausible_excluded": n_pos - len(shares)}
        all_share += shares
        all_hit += hits
        all_iou += ious
    return {"cam_in_anatomy": _mean(all_share), "pointing_game": _mean(all_hit), "iou": _mean(all_iou),
            "n_implausible_excluded": int((~plausible).sum()), "per_label": per_label}


def evaluate_cycle(model, meta: dict, params: Params, manifest: pd.DataFrame, boxes: pd.DataFrame,
                   images: ArrayStore, masks: ArrayStore, grid_ids: list[str],
                   markers: pd.DataFrame | None = None, plausible: np.ndarray | None = None,
                   compute: Compute = CPU) -> tuple[dict, dict]:
    """(scores, grid): every score of DESIGN.md for one model, JSON-ready (null where a dataset cannot
    give a figure), and the fixed grid images' CAMs for the report. `markers`: the shortcut audit's
    marker table, when the audit is on. `plausible`: per mask-store row, whether its anatomy mask
    passed the checks (anatomy_checks.load_plausibility); implausible films leave cam_in_anatomy.
    The model is moved to `compute.device` (a no-op on the CPU)."""
    model = model.to(compute.device)
    labels, arch = meta["labels"], meta["arch"]
    thresholds = np.asarray(meta["thresholds"], dtype=np.float64)
    ev = params.evaluate
    out: dict = {"cycle": meta["cycle"], "labels": labels}
    splits = {}
    for split in ("test", "test_shifted"):
        idx = rows(manifest, split)
        if len(idx) == 0:
            continue
        y = label_matrix(manifest.iloc[idx], labels)
        probs = predict(model, images, idx, compute=compute)
        splits[split] = classification_metrics(y, probs, thresholds, labels)
        splits[split]["roc"] = {lab: roc_curve_points(y[:, k], probs[:, k]) for k, lab in enumerate(labels)}
    test = splits.get("test")
    if test is None:
        raise ValueError("the manifest has no test split to evaluate on")
    shifted = splits.get("test_shifted")
    out.update({k: test[k] for k in ("auroc_macro", "accuracy", "f1", "sensitivity", "specificity")})
    out["accuracy_shifted"] = shifted["accuracy"] if shifted else None
    out["auroc_shifted"] = shifted["auroc_macro"] if shifted else None
    out["shortcut_gap"] = (out["accuracy"] - out["accuracy_shifted"]
                           if shifted and out["accuracy"] is not None and out["accuracy_shifted"] is not None else None)

    # where the model looks, on unmodified test images
    test_idx = rows(manifest, "test")[: ev.n_cam_images]
    cams = resize(low_res_cams(model, arch, images, test_idx, params.cam.method), images.item_shape[-1]).numpy()
    loc = localisation(cams, masks.read(test_idx), label_matrix(manifest.iloc[test_idx], labels),
                       manifest["image_id"].iloc[test_idx].tolist(), boxes, labels, ev.pointing_tolerance_px,
                       None if plausible is None else np.asarray(plausible, bool)[test_idx])
    out.update({k: loc[k] for k in ("cam_in_anatomy", "pointing_game", "iou", "n_implausible_excluded")})
    out.update(dict.fromkeys(AUDIT_KEYS))
    if markers is not None and params.audit.label in labels:
        boxes_drawn = marker_boxes(markers, manifest["image_id"].iloc[test_idx].astype(str).tolist())
        audit = marker_scores(cams[:, labels.index(params.audit.label)], boxes_drawn, ev.pointing_tolerance_px)
        out.update({k: audit[k] for k in AUDIT_KEYS})
        out["audit"] = {"label": params.audit.label, "p": params.audit.p, "n_marked": audit["n_marked"]}

    # faithfulness (ROAD) per label on positives, and the sanity check
    road = {}
    y_test = label_matrix(manifest.iloc[test_idx], labels)
    for k, label in enumerate(labels):
        pos = np.flatnonzero(y_test[:, k] == 1)[: ev.n_faithfulness_images]
        if len(pos) == 0:
            road[label] = None
            continue
        x_all = next(iterate_batches(images, test_idx[pos], None, len(pos)))[0]
        road[label] = float(road_score(model, x_all, cams[pos, k], k))
    out["faithfulness"] = _mean(road.values())
    sanity_idx = test_idx[: ev.n_sanity_images]
    x_sanity = next(iterate_batches(images, sanity_idx, None, len(sanity_idx)))[0]

    def cam_fn(m, x):
        return AllLabelCAM(m, arch, params.cam.method)(x)

    sanity = cascading_randomization(model, x_sanity, cam_fn, seed=params.train.seed)
    out["sanity_rank_corr"] = sanity["final_rank_corr"]
    out["sanity"] = sanity

    out["per_label"] = {
        label: {**{f"test_{k}": v for k, v in test["per_label"][label].items()},
                **({f"shifted_{k}": v for k, v in shifted["per_label"][label].items()} if shifted else {}),
                **loc["per_label"][label], "faithfulness": road[label]}
        for label in labels
    }
    out["roc"] = {split: s["roc"] for split, s in splits.items()}

    # low-res CAMs of the fixed grid images, for the report's per-cycle and before/after grids
    pos_of = {iid: i for i, iid in enumerate(manifest["image_id"].tolist())}
    grid_idx = np.asarray([pos_of[i] for i in grid_ids if i in pos_of], dtype=np.int64)
    grid = {"image_ids": [manifest["image_id"].iloc[i] for i in grid_idx]}
    if len(grid_idx):
        grid["probs"] = predict(model, images, grid_idx, compute=compute).round(4).tolist()
        grid["cams"] = to_storage(low_res_cams(model, arch, images, grid_idx, params.cam.method), params.cam.size)
    return out, grid
