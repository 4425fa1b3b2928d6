"""Score one cycle's model on the *unmodified* images: accuracy and where it looks.

Thresholds come from the checkpoint (chosen on val during training), never from test.
The model runs on `compute.device`: probabilities under `compute.precision` (autocast), every CAM
and the metrics built on CAMs (localisation, ROAD, the sanity check) in fp32 (pipeline/cam/all_labels.py).

`evaluate_cycle` composes one step per family of figures (README, "Reports"): `classification`
(with its curves), `where_it_looks` (localisation), `audit_marker_scores`, `faithfulness`,
`cascading_sanity` and `grid` (the report's fixed heatmap grid).
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
from pipeline.curves import label_curves
from pipeline.data.dataset import iterate_batches, predict
from pipeline.data.labels import anatomy_of
from pipeline.data.manifest import label_matrix, rows
from pipeline.data.record import decode_anatomy
from pipeline.data.store import ArrayStore
from pipeline.metrics.classification import classification_metrics
from pipeline.metrics.faithfulness import road_score
from pipeline.metrics.localization import boxes_to_mask, cam_iou, energy_share, pointing_game_hit
from pipeline.metrics.sanity import cascading_randomization
from pipeline.scores import CycleScores

log = logging.getLogger(__name__)

SPLITS = ("test", "test_shifted")  # scored splits: unmodified test images, and the shortcut's flipped copy


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


def classification(model, images: ArrayStore, manifest: pd.DataFrame, labels: list[str], thresholds: np.ndarray,
                   compute: Compute = CPU) -> dict[str, dict]:
    """Per split of SPLITS present: classification_metrics at the checkpoint's thresholds, and under
    "curves" its ROC, precision-recall and calibration points per label (pipeline/curves.py)."""
    splits = {}
    for split in SPLITS:
        idx = rows(manifest, split)
        if len(idx) == 0:
            continue
        y = label_matrix(manifest.iloc[idx], labels)
        probs = predict(model, images, idx, compute=compute)
        splits[split] = classification_metrics(y, probs, thresholds, labels)
        splits[split]["curves"] = label_curves(y, probs, labels)
    if "test" not in splits:
        raise ValueError("the manifest has no test split to evaluate on")
    return splits


def classification_scores(splits: dict[str, dict]) -> dict:
    """The headline classification figures: test's, and accuracy / AUROC on test_shifted with the gap
    between the two accuracies (None without a test_shifted split)."""
    test, shifted = splits["test"], splits.get("test_shifted")
    out = {k: test[k] for k in CycleScores.CLASSIFICATION}
    out["accuracy_shifted"] = shifted["accuracy"] if shifted else None
    out["auroc_shifted"] = shifted["auroc_macro"] if shifted else None
    out["shortcut_gap"] = (out["accuracy"] - out["accuracy_shifted"]
                           if shifted and out["accuracy"] is not None and out["accuracy_shifted"] is not None else None)
    return out


def where_it_looks(model, arch: str, method: str, images: ArrayStore, masks: ArrayStore, manifest: pd.DataFrame,
                   boxes: pd.DataFrame, labels: list[str], test_idx: np.ndarray, tolerance_px: int,
                   plausible: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """(CAMs of the `test_idx` films at image resolution, `localisation` of them): where the model looks."""
    cams = resize(low_res_cams(model, arch, images, test_idx, method), images.item_shape[-1]).numpy()
    loc = localisation(cams, masks.read(test_idx), label_matrix(manifest.iloc[test_idx], labels),
                       manifest["image_id"].iloc[test_idx].tolist(), boxes, labels, tolerance_px,
                       None if plausible is None else np.asarray(plausible, bool)[test_idx])
    return cams, loc


def audit_marker_scores(cams: np.ndarray, manifest: pd.DataFrame, test_idx: np.ndarray, labels: list[str],
                        markers: pd.DataFrame | None, params: Params) -> dict:
    """With the shortcut audit on: where the audit label's heatmaps look on the films carrying the
    marker (CycleScores.AUDIT), and the audit's settings under "audit"; the figures None otherwise."""
    out = dict.fromkeys(CycleScores.AUDIT)
    if markers is None or params.audit.label not in labels:
        return out
    drawn = marker_boxes(markers, manifest["image_id"].iloc[test_idx].astype(str).tolist())
    audit = marker_scores(cams[:, labels.index(params.audit.label)], drawn, params.evaluate.pointing_tolerance_px)
    return out | {k: audit[k] for k in CycleScores.AUDIT} | {
        "audit": {"label": params.audit.label, "p": params.audit.p, "n_marked": audit["n_marked"]}}


def faithfulness(model, images: ArrayStore, test_idx: np.ndarray, y_test: np.ndarray, cams: np.ndarray,
                 labels: list[str], n_images: int) -> dict[str, float | None]:
    """ROAD per label on its first `n_images` positive test films (None for a label without one)."""
    road = {}
    for k, label in enumerate(labels):
        pos = np.flatnonzero(y_test[:, k] == 1)[:n_images]
        if len(pos) == 0:
            road[label] = None
            continue
        x_all = next(iterate_batches(images, test_idx[pos], None, len(pos)))[0]
        road[label] = float(road_score(model, x_all, cams[pos, k], k))
    return road


def cascading_sanity(model, arch: str, method: str, images: ArrayStore, sanity_idx: np.ndarray, seed: int) -> dict:
    """Cascading model-parameter randomisation (Adebayo et al.) of this model's heatmaps on `sanity_idx`."""
    x_sanity = next(iterate_batches(images, sanity_idx, None, len(sanity_idx)))[0]

    def cam_fn(m, x):
        return AllLabelCAM(m, arch, method)(x)

    return cascading_randomization(model, x_sanity, cam_fn, seed=seed)


def per_label(labels: list[str], splits: dict[str, dict], loc: dict, road: dict) -> dict:
    """Every figure per label: test_* and shifted_* classification, localisation, faithfulness."""
    test, shifted = splits["test"], splits.get("test_shifted")
    return {
        label: {**{f"test_{k}": v for k, v in test["per_label"][label].items()},
                **({f"shifted_{k}": v for k, v in shifted["per_label"][label].items()} if shifted else {}),
                **loc["per_label"][label], "faithfulness": road[label]}
        for label in labels
    }


def grid(model, arch: str, method: str, cam_size: int, images: ArrayStore, manifest: pd.DataFrame,
         grid_ids: list[str], compute: Compute = CPU) -> dict:
    """The fixed grid films present in the manifest: their ids, probabilities and low-res CAMs, for the
    per-cycle CAM grid and the report's before/after grid."""
    pos_of = {iid: i for i, iid in enumerate(manifest["image_id"].tolist())}
    grid_idx = np.asarray([pos_of[i] for i in grid_ids if i in pos_of], dtype=np.int64)
    out = {"image_ids": [manifest["image_id"].iloc[i] for i in grid_idx], "index": grid_idx}
    if len(grid_idx):
        out["probs"] = predict(model, images, grid_idx, compute=compute).round(4).tolist()
        out["cams"] = to_storage(low_res_cams(model, arch, images, grid_idx, method), cam_size)
    return out


def evaluate_cycle(model, meta: dict, params: Params, manifest: pd.DataFrame, boxes: pd.DataFrame,
                   images: ArrayStore, masks: ArrayStore, grid_ids: list[str],
                   markers: pd.DataFrame | None = None, plausible: np.ndarray | None = None,
                   compute: Compute = CPU) -> tuple[dict, dict, dict]:
    """(scores, curves, grid) for one model. scores: every figure of README "Reports", JSON-ready (null
    where a dataset cannot give one); curves: {split: {label: curves}} (pipeline/curves.py); grid: the
    fixed grid films' CAMs (`grid`). `markers`: the shortcut audit's marker table, when the audit is
    on. `plausible`: per mask-store row, whether its anatomy mask passed the checks
    (anatomy_checks.load_plausibility); implausible films leave cam_in_anatomy.
    The model is moved to `compute.device` (a no-op on the CPU)."""
    model = model.to(compute.device)
    labels, arch, method = meta["labels"], meta["arch"], params.cam.method
    thresholds = np.asarray(meta["thresholds"], dtype=np.float64)
    ev = params.evaluate
    splits = classification(model, images, manifest, labels, thresholds, compute)
    out: dict = {"cycle": meta["cycle"], "labels": labels, **classification_scores(splits)}

    test_idx = rows(manifest, "test")[: ev.n_cam_images]
    cams, loc = where_it_looks(model, arch, method, images, masks, manifest, boxes, labels, test_idx,
                               ev.pointing_tolerance_px, plausible)
    out.update({k: loc[k] for k in (*CycleScores.LOCALISATION, "n_implausible_excluded")})
    out.update(audit_marker_scores(cams, manifest, test_idx, labels, markers, params))

    road = faithfulness(model, images, test_idx, label_matrix(manifest.iloc[test_idx], labels), cams, labels,
                        ev.n_faithfulness_images)
    out["faithfulness"] = _mean(road.values())
    sanity = cascading_sanity(model, arch, method, images, test_idx[: ev.n_sanity_images], params.train.seed)
    out["sanity_rank_corr"] = sanity["final_rank_corr"]
    out["sanity"] = sanity
    out["per_label"] = per_label(labels, splits, loc, road)
    curves = {split: s["curves"] for split, s in splits.items()}
    return out, curves, grid(model, arch, method, params.cam.size, images, manifest, grid_ids, compute)
