"""DVC stage `enhance`: the next cycle's training images (and, for label-blind policies, the same
transform of the val images for checkpoint selection), and proof they add no new class cue."""
import logging

import numpy as np
import pandas as pd

from pipeline import figures
from pipeline.anatomy_checks import open_masks
from pipeline.data.manifest import label_matrix, resolve_labels, rows
from pipeline.data.store import ArrayStore
from pipeline.engine import open_engine
from pipeline.enhance import LABEL_BLIND, apply_plan, class_separability, enhance
from pipeline.feedback import shortcut_region
from pipeline.io import write_json
from pipeline.stages.common import cycle_arg, skip_if_stopped, stage_main

log = logging.getLogger(__name__)
SEPARABILITY_SAMPLE = 1000


def run(params, paths, args) -> None:
    k, p = args.cycle, params.enhance
    if skip_if_stopped(params, paths, k, [paths.enhanced(k), paths.enhance_figures(k), paths.enhance_stats(k)]):
        return
    manifest = pd.read_parquet(paths.manifest)
    labels = resolve_labels(params.data.labels, manifest)
    train_idx, val_idx = rows(manifest, "train"), rows(manifest, "val")
    targets = label_matrix(manifest, labels)[train_idx]
    # an implausible film's mask reads as the population prior (pipeline/anatomy_checks.py)
    images, masks, cams = ArrayStore(paths.images), open_masks(paths.masks), ArrayStore(paths.cams(k))
    if cams.attrs.get("labels") != labels:
        raise ValueError(f"CAMs of c{k} are for labels {cams.attrs.get('labels')}, expected {labels}")
    reviewed, n_boxes = shortcut_region(paths, images.item_shape[-1])  # clinicians' shortcut marks
    with open_engine(params.engine, params.compute.device) as engine:
        out, plan = enhance(p, images, masks, cams, train_idx, targets, labels, paths.enhanced_train(k),
                            params.data.shard_size, cycle=k, engine=engine, reviewed=reviewed)
        if p.policy in LABEL_BLIND and len(val_idx):  # the same transform, so selection sees no shortcut either
            apply_plan(p, plan, images, masks, val_idx, paths.enhanced_val(k), params.data.shard_size,
                       [p.seed, k, 1], engine=engine)
    stats = plan.stats
    stats["reviewed_shortcut_boxes"] = n_boxes
    sample = np.arange(min(SEPARABILITY_SAMPLE, len(train_idx)))
    raw, enh = images.read(train_idx[sample]), out.read(sample)
    region = masks.read(train_idx[sample]) > 0
    stats["separability"] = {
        label: {"raw": class_separability(raw, region, targets[sample, j]),
                "enhanced": class_separability(enh, region, targets[sample, j])}
        for j, label in enumerate(labels)
    }
    write_json(paths.enhance_stats(k), stats)
    figures.save_atlas(paths.enhance_figures(k) / "atlas.png", plan.atlas, plan.hot, plan.keep, raw.mean(axis=0))
    figures.save_before_after(paths.enhance_figures(k) / "examples.png", raw[:6], enh[:6], f"cycle {k}: {p.policy}")
    log.info("cycle %d: %s enhancement of %d images; hot fraction %.3f", k, p.policy, len(train_idx),
             stats["hot_fraction"])


if __name__ == "__main__":
    stage_main("enhance", run, cycle_arg)
