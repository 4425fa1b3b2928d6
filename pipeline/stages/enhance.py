"""DVC stage `enhance`: the next cycle's training images, and proof they add no new class cue."""
import logging

import numpy as np
import pandas as pd

from pipeline import figures
from pipeline.data.manifest import label_matrix, resolve_labels, rows
from pipeline.data.store import ArrayStore
from pipeline.enhance import class_separability, enhance
from pipeline.io import write_json
from pipeline.stages.common import cycle_arg, stage_main

log = logging.getLogger(__name__)
SEPARABILITY_SAMPLE = 1000


def run(params, paths, args) -> None:
    k = args.cycle
    manifest = pd.read_parquet(paths.manifest)
    labels = resolve_labels(params.data.labels, manifest)
    train_idx = rows(manifest, "train")
    targets = label_matrix(manifest, labels)[train_idx]
    images, masks, cams = ArrayStore(paths.images), ArrayStore(paths.masks), ArrayStore(paths.cams(k))
    if cams.attrs.get("labels") != labels:
        raise ValueError(f"CAMs of c{k} are for labels {cams.attrs.get('labels')}, expected {labels}")
    out, stats, (atlas, keep_atlas) = enhance(params.enhance, images, masks, cams, train_idx, targets, labels,
                                paths.enhanced(k), params.data.shard_size, cycle=k)
    sample = np.arange(min(SEPARABILITY_SAMPLE, len(train_idx)))
    raw, enh = images.read(train_idx[sample]), out.read(sample)
    region = masks.read(train_idx[sample]) > 0
    stats["separability"] = {
        label: {"raw": class_separability(raw, region, targets[sample, j]),
                "enhanced": class_separability(enh, region, targets[sample, j])}
        for j, label in enumerate(labels)
    }
    report_dir = paths.root / "reports" / "enhance" / f"c{k}"
    write_json(report_dir / "stats.json", stats)
    figures.save_atlas(report_dir / "figures" / "atlas.png", atlas, keep_atlas, raw.mean(axis=0),
                       params.enhance.cam_threshold)
    figures.save_before_after(report_dir / "figures" / "examples.png", raw[:6], enh[:6], f"cycle {k}: {params.enhance.policy}")
    log.info("cycle %d: %s enhancement of %d images; hot fraction %.3f", k, params.enhance.policy,
             len(train_idx), stats["hot_fraction"])


if __name__ == "__main__":
    stage_main("enhance", run, cycle_arg)
