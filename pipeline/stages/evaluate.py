"""DVC stage `evaluate`: one cycle's scores on unmodified test/test_shifted images."""
import logging

import numpy as np
import pandas as pd

from pipeline.anatomy_checks import load_plausibility
from pipeline.compute import Compute
from pipeline.data.store import ArrayStore
from pipeline.evaluation import evaluate_cycle, headline
from pipeline.io import atomic_path, read_json, write_json
from pipeline.models.checkpoint import file_sha256, load_model
from pipeline.stages.common import cycle_arg, stage_main

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    k = args.cycle
    compute = Compute.from_params(params.compute)
    model, meta = load_model(paths.model(k), compute.device)
    manifest = pd.read_parquet(paths.manifest)
    boxes = pd.read_parquet(paths.boxes)
    grid_ids = read_json(paths.grid)["image_ids"][: params.report.grid_images]
    markers = pd.read_parquet(paths.audit_markers) if paths.audit_on else None
    scores, grid = evaluate_cycle(model, meta, params, manifest, boxes, ArrayStore(paths.images),
                                  ArrayStore(paths.masks), grid_ids, markers, load_plausibility(paths.masks),
                                  compute)
    scores["model"] = {"path": str(paths.model(k) / "model.safetensors"),
                       "sha256": file_sha256(paths.model(k) / "model.safetensors"),
                       **{key: meta[key] for key in ("arch", "labels", "image_size", "parent", "data_hash",
                                                     "enhance_policy", "thresholds", "best_epoch", "source")}}
    out = paths.cycle_report(k)
    roc = scores.pop("roc")
    write_json(out / "roc.json", roc)
    write_json(paths.cycle_scores(k), scores)
    write_json(paths.cycle_metrics(k), headline(scores))
    with atomic_path(out / "grid.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, image_ids=np.asarray(grid["image_ids"]), cams=grid.get("cams", np.zeros(0)),
                     probs=np.asarray(grid.get("probs", [])))
    log.info("cycle %d: AUROC %.3f acc %.3f shifted %.3f pointing %s in-anatomy %s sanity %.3f", k,
             scores["auroc_macro"] or float("nan"), scores["accuracy"] or float("nan"),
             scores["accuracy_shifted"] or float("nan"), scores["pointing_game"], scores["cam_in_anatomy"],
             scores["sanity_rank_corr"])


if __name__ == "__main__":
    stage_main("evaluate", run, cycle_arg)
