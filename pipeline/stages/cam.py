"""DVC stage `cam`: Grad-CAMs of the previous cycle's model on the raw training images (low-res float16)."""
import logging

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.cam.library import dataset_cams
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
    s, n_labels = params.cam.size, len(meta["labels"])
    writer = ArrayStoreWriter(paths.cams(k), (n_labels, s, s), np.float16, params.data.shard_size,
                              attrs={"model_cycle": prev, "labels": meta["labels"], "method": params.cam.method,
                                     "rows": "train"})
    bs = params.cam.batch_size
    for batch in tqdm(dataset_cams(model, meta["arch"], images, idx, n_labels, bs, s, params.cam.method),
                      total=-(-len(idx) // bs), desc=f"cam c{k}", unit="batch", mininterval=5):
        writer.append(batch)
    writer.close()
    log.info("cycle %d: %d CAMs of model c%d", k, len(idx), prev)


if __name__ == "__main__":
    stage_main("cam", run, cycle_arg)
