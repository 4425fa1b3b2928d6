"""DVC stage `segment`: train the anatomy U-Net, predict lungs/heart for every image, score it.

It learns from the data's own masks (the phantom) unless `segment.mask_sources` names mask datasets
(Montgomery, Shenzhen, JSRT/SCR); a real dataset without either falls back to phantom masks.
"""
import logging

import numpy as np
import pandas as pd

from pipeline.data.manifest import rows
from pipeline.data.store import ArrayStore
from pipeline.engine import open_engine
from pipeline.io import write_json
from pipeline.segmentation import (evaluate_masks, evaluate_stores, mask_sets, predict_masks, predict_store,
                                   save_unet, train_unet)
from pipeline.stages.common import stage_main

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    p = params.segment
    manifest = pd.read_parquet(paths.prepared_manifest)
    images = ArrayStore(paths.prepared_images)
    has_truth = (paths.gt_masks / "index.json").is_file()
    truth = ArrayStore(paths.gt_masks) if has_truth else None
    if has_truth and not p.mask_sources:
        train_idx = rows(manifest, "train")[: p.n_train]
        net = train_unet(p, images.read(train_idx), truth.read(train_idx), np.ones((len(train_idx), 2), bool))
        scores = {"sources": [params.data.source], "n_train": int(len(train_idx)), "quarantined": 0}
    else:
        train, held, quarantined = mask_sets(params)
        net = train_unet(p, train.images, train.masks, train.known)
        held_pred = predict_masks(net, held.images, p.size, images.item_shape[-1])
        scores = {"sources": sorted(set(train.sources)), "n_train": len(train.images),
                  "quarantined": len(quarantined), "held_out": evaluate_masks(held_pred, held.masks, held.known)}
    unet_path = paths.unet / "unet.safetensors"
    save_unet(unet_path, net, p)
    with open_engine(params.engine) as engine:
        pred = predict_store(engine, unet_path.resolve(), images, paths.predicted_masks, params.data.shard_size)
    if has_truth:  # the data's own ground truth, on images the U-Net never saw
        val = rows(manifest, "val")
        scores["val"] = evaluate_stores(pred, truth, val)
    else:
        scores["val"] = scores["held_out"]
    log.info("U-Net scores: %s", scores["val"])
    write_json(paths.segment_report / "metrics.json", scores)


if __name__ == "__main__":
    stage_main("segment", run)
