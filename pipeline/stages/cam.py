"""DVC stage `cam`: Grad-CAMs of the previous cycle's model on the raw training images (low-res float16)."""
import logging

import pandas as pd

from pipeline.cam.store import write_cams
from pipeline.data.manifest import rows
from pipeline.engine import open_engine
from pipeline.models.checkpoint import MODEL_FILE, read_meta
from pipeline.stages.common import cycle_arg, skip_if_stopped, stage_main

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    k = args.cycle
    if skip_if_stopped(params, paths, k, [paths.cams(k)]):
        return
    prev = params.cycles[f"c{k}"].prev
    idx = rows(pd.read_parquet(paths.manifest), "train")
    if not len(idx):
        raise ValueError(f"cycle {k}: no training images to explain")
    meta = read_meta(paths.model(prev) / MODEL_FILE)
    attrs = {"model_cycle": prev, "labels": meta["labels"], "method": params.cam.method, "rows": "train"}
    # the stored side is the target layer's grid unless cam.size sets one
    with open_engine(params.engine, params.compute.device) as engine:
        write_cams(engine, paths.model(prev).resolve(), paths.images.resolve(), idx, paths.cams(k),
                   params.cam.method, params.cam.size, params.cam.batch_size, params.data.shard_size, attrs,
                   params.compute)  # the device only: CAMs are fp32 on every compute.precision
    log.info("cycle %d: %d CAMs of model c%d (%s, compute.device %s)", k, len(idx), prev, engine.description,
             params.compute.device)


if __name__ == "__main__":
    stage_main("cam", run, cycle_arg)
