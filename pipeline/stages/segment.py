"""DVC stage `segment`: train the anatomy U-Net, predict lungs/heart for every image, check and score it.

It learns from the data's own masks (the phantom) unless `segment.mask_sources` names mask datasets
(Montgomery, Shenzhen, JSRT/SCR); a real dataset without either falls back to phantom masks.
Every predicted mask is cleaned and checked (pipeline/anatomy_checks.py): the table and the prior
go into the mask store's folder, the counts into metrics.json, the implausible films into
implausible.csv, and a preview per split shows what the masks look like on data without ground truth.
"""
import logging
import time

import numpy as np
import pandas as pd

from pipeline import figures
from pipeline.anatomy_checks import checks_frame, write_checks
from pipeline.compute import Compute
from pipeline.data.manifest import rows
from pipeline.data.store import ArrayStore
from pipeline.engine import open_engine
from pipeline.io import write_json, write_text
from pipeline.segmentation import (evaluate_masks, evaluate_native, evaluate_stores, mask_sets, predict_masks,
                                   predict_store, save_unet, train_unet)
from pipeline.stages.common import stage_main

log = logging.getLogger(__name__)
PREVIEW_SPLITS = ("train", "val", "test")
PREVIEW_FILMS = 16


def run(params, paths, args) -> None:
    p = params.segment
    manifest = pd.read_parquet(paths.prepared_manifest)
    images = ArrayStore(paths.prepared_images)
    has_truth = (paths.gt_masks / "index.json").is_file()
    truth = ArrayStore(paths.gt_masks) if has_truth else None
    compute = Compute.from_params(params.compute)
    log.info("U-Net on %s in %s", compute.device, compute.precision)
    started = time.monotonic()
    if has_truth and not p.mask_sources:
        train_idx = rows(manifest, "train")[: p.n_train]
        net = train_unet(p, images.read(train_idx), truth.read(train_idx), np.ones((len(train_idx), 2), bool),
                         compute)
        scores = {"sources": [params.data.source], "n_train": int(len(train_idx)), "quarantined": 0}
        train_seconds = time.monotonic() - started
    else:
        train, held, quarantined = mask_sets(params)
        net = train_unet(p, train.images, train.masks, train.known, compute)
        train_seconds = time.monotonic() - started
        at_input = evaluate_masks(predict_masks(net, held.images, p.size, p.size, compute), held.masks, held.known)
        scores = {"sources": sorted(set(train.sources)), "n_train": len(train.images),
                  "quarantined": len(quarantined),
                  "held_out": evaluate_native(net, held, p.size, compute),  # at the masks' own resolution
                  "held_out_at_input": {**at_input, "resolution": p.size}}
    scores["size"] = p.size  # (no timing in metrics.json: DVC outputs are the same bytes every run)
    log.info("U-Net trained in %.0f s on %d films at %d px", train_seconds, scores["n_train"], p.size)
    unet_path = paths.unet_weights
    save_unet(unet_path, net, p)
    with open_engine(params.engine, params.compute.device) as engine:
        pred, checks = predict_store(engine, unet_path.resolve(), images, paths.predicted_masks,
                                     params.data.shard_size, params.compute)  # resolved in each task
    frame = checks_frame(manifest["image_id"], checks)
    frame.insert(1, "split", manifest["split"].to_numpy())
    write_checks(paths.predicted_masks, frame)
    if has_truth:  # the data's own ground truth, on images the U-Net never saw
        scores["val"] = evaluate_stores(pred, truth, rows(manifest, "val"))
    else:
        scores["val"] = scores["held_out"]
    bad = frame[~frame["plausible"]]
    scores.update(implausible=len(bad), blobs_removed=int(frame["blobs_removed"].sum()), n_checked=len(frame),
                  implausible_by_split={s: int(n) for s, n in bad["split"].value_counts().sort_index().items()})
    write_text(paths.segment_implausible, bad.to_csv(index=False))
    scores["previews"] = write_previews(paths, manifest, images, pred, frame, p.seed)
    log.info("U-Net scores: %s; %d of %d masks implausible, %d cleaned of blobs", scores["val"], len(bad),
             len(frame), scores["blobs_removed"])
    if len(frame) and len(bad) > 0.1 * len(frame):
        log.warning("%.0f%% of the predicted masks are implausible (reports/segment/implausible.csv): the "
                    "U-Net may not suit this dataset", 100 * len(bad) / len(frame))
    write_json(paths.segment_metrics, scores)


def write_previews(paths, manifest: pd.DataFrame, images: ArrayStore, masks: ArrayStore, frame: pd.DataFrame,
                   seed: int) -> list[str]:
    """reports/segment/preview_<split>.png: the masks over PREVIEW_FILMS random films of each split
    (fixed seed), implausible ones marked; a split without films gets a picture that says so (the
    files are DVC outputs). Returns the file names."""
    for k, split in enumerate(PREVIEW_SPLITS):
        idx = rows(manifest, split)
        pick = np.sort(np.random.default_rng([seed, k]).choice(idx, min(PREVIEW_FILMS, len(idx)), replace=False))
        sel = frame.iloc[pick]
        figures.save_mask_preview(paths.segment_preview(split), images.read(pick),
                                  masks.read(pick), sel["plausible"].to_numpy(bool), sel["reason"].tolist(),
                                  f"{split}: predicted lungs (cyan) and heart (red), {len(pick)} random films")
    return [paths.segment_preview(split).name for split in PREVIEW_SPLITS]


if __name__ == "__main__":
    stage_main("segment", run)
