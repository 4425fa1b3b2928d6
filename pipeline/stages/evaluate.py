"""DVC stage `evaluate`: one cycle's scores on unmodified test/test_shifted images, its ROC, PR and
calibration curves (DVC plots), and its heatmaps of the fixed test films (grid.npz, cam_grid.png)."""
import logging

import numpy as np
import pandas as pd

from pipeline import figures
from pipeline.anatomy_checks import load_plausibility
from pipeline.compute import Compute
from pipeline.curves import curve_paths, write_curves
from pipeline.data.manifest import label_matrix
from pipeline.data.store import ArrayStore
from pipeline.evaluation import evaluate_cycle
from pipeline.io import atomic_path, read_json, write_json
from pipeline.models.checkpoint import MODEL_FILE, file_sha256, load_model
from pipeline.scores import CycleScores
from pipeline.stages.common import cycle_arg, skip_if_stopped, stage_main

log = logging.getLogger(__name__)


def write_grid(paths, k: int, grid: dict, images: ArrayStore, manifest: pd.DataFrame, labels: list[str]) -> None:
    """grid.npz (the report's before/after grid reads it) and cam_grid.png, the cycle's heatmap grid."""
    idx = grid["index"]
    if not len(idx):
        raise ValueError(f"none of the fixed grid films ({paths.grid}) is in {paths.manifest}")
    with atomic_path(paths.cycle_grid(k)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, image_ids=np.asarray(grid["image_ids"]), cams=grid["cams"], probs=np.asarray(grid["probs"]))
    figures.save_cam_grid(paths.cycle_cam_grid(k), images.read(idx), grid["cams"], labels,
                          label_matrix(manifest, labels)[idx], np.asarray(grid["probs"]),
                          f"cycle {k}: Grad-CAM per label on fixed test images")


def run(params, paths, args) -> None:
    k = args.cycle
    # a cycle the stop rule skipped: placeholders for every output dvc.yaml lists for evaluate
    if k and skip_if_stopped(params, paths, k, [*curve_paths(paths, k).values(), paths.cycle_grid(k),
                                                paths.cycle_cam_grid(k), paths.cycle_scores(k),
                                                paths.cycle_metrics(k)]):
        return
    compute = Compute.from_params(params.compute)
    model, meta = load_model(paths.model(k), compute.device)
    manifest = pd.read_parquet(paths.manifest)
    boxes = pd.read_parquet(paths.boxes)
    grid_ids = read_json(paths.grid)["image_ids"][: params.report.grid_images]
    markers = pd.read_parquet(paths.audit_markers) if paths.audit_on else None
    images = ArrayStore(paths.images)
    scores, curves, grid = evaluate_cycle(model, meta, params, manifest, boxes, images, ArrayStore(paths.masks),
                                          grid_ids, markers, load_plausibility(paths.masks), compute)
    weights = paths.model(k) / MODEL_FILE
    scores["model"] = {"path": str(weights), "sha256": file_sha256(weights),
                       **{key: meta[key] for key in ("arch", "labels", "image_size", "parent", "data_hash",
                                                     "enhance_policy", "thresholds", "best_epoch", "source")}}
    write_curves(paths, k, curves)
    write_json(paths.cycle_scores(k), scores)
    write_json(paths.cycle_metrics(k), CycleScores.of(scores).headline())
    write_grid(paths, k, grid, images, manifest, meta["labels"])
    log.info("cycle %d: AUROC %.3f acc %.3f shifted %.3f pointing %s in-anatomy %s sanity %.3f", k,
             scores["auroc_macro"] or float("nan"), scores["accuracy"] or float("nan"),
             scores["accuracy_shifted"] or float("nan"), scores["pointing_game"], scores["cam_in_anatomy"],
             scores["sanity_rank_corr"])


if __name__ == "__main__":
    stage_main("evaluate", run, cycle_arg)
