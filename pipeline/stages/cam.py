"""DVC stage `cam`: Grad-CAMs of the previous cycle's model on the raw training images (low-res float16)."""
import logging

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.cam.all_labels import dataset_cams
from pipeline.data.dataset import iterate_batches
from pipeline.data.manifest import rows
from pipeline.data.store import ArrayStore, ArrayStoreWriter
from pipeline.models.checkpoint import load_model
from pipeline.stages.common import cycle_arg, stage_main

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    k = args.cycle
    prev = params.cycles[f"c{k}"].prev
    model, meta = load_model(paths.model(prev))
    manifest = pd.read_parquet(paths.manifest)
    idx = rows(manifest, "train")
    images = ArrayStore(paths.images)
    bs = params.cam.batch_size
    batches = (x for x, _, _ in iterate_batches(images, idx, None, bs))
    writer = None
    for batch in tqdm(dataset_cams(model, meta["arch"], batches, params.cam.method, params.cam.size),
                      total=-(-len(idx) // bs), desc=f"cam c{k}", unit="batch", mininterval=5):
        if writer is None:  # the stored side is the target layer's grid unless cam.size sets one
            writer = ArrayStoreWriter(paths.cams(k), batch.shape[1:], np.float16, params.data.shard_size,
                                      attrs={"model_cycle": prev, "labels": meta["labels"],
                                             "method": params.cam.method, "rows": "train"})
        writer.append(batch)
    if writer is None:
        raise ValueError(f"cycle {k}: no training images to explain")
    writer.close()
    log.info("cycle %d: %d CAMs of model c%d", k, len(idx), prev)


if __name__ == "__main__":
    stage_main("cam", run, cycle_arg)
