"""DVC stage `segment`: train the anatomy U-Net, predict lungs/heart for every image, score it."""
import logging

import pandas as pd

from pipeline.data.manifest import rows
from pipeline.data.store import ArrayStore
from pipeline.io import write_json
from pipeline.segmentation import evaluate_masks, predict_store, save_unet, train_unet
from pipeline.stages.common import stage_main

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    manifest = pd.read_parquet(paths.manifest)
    images = ArrayStore(paths.images)
    if not (paths.gt_masks / "index.json").is_file():
        raise ValueError(f"segment: data.source={params.data.source} provides no anatomy masks to train the U-Net on")
    truth = ArrayStore(paths.gt_masks)
    train_idx = rows(manifest, "train")[: params.segment.n_train]
    net = train_unet(params.segment, images, truth, train_idx)
    save_unet(paths.unet / "unet.safetensors", net, params.segment)
    pred = predict_store(net, images, paths.masks, params.segment.size, params.data.shard_size)
    held_out = rows(manifest, "val")
    scores = {"val": evaluate_masks(pred, truth, held_out), "n_train": int(len(train_idx))}
    log.info("U-Net on held-out val: %s", scores["val"])
    write_json(paths.segment_report / "metrics.json", scores)


if __name__ == "__main__":
    stage_main("segment", run)
