"""DVC stage `train`: cycle 0 from scratch on raw images; cycle K fine-tunes cycle K-1 on enhanced images.

Cycle K picks its checkpoint on the val images under the same enhancement when the policy is
label-blind: raw val images carry the shortcut (markers agree with labels 95 % of the time), so
selecting on them rewards the epochs that still read it. Operating thresholds are always chosen on
the unmodified val images, the kind the model will meet.

`train.trainable_last_n` / `train.trainable_blocks` freeze the rest of the network in every cycle;
the checkpoint records its builder options (`model_kwargs`) and the trainable share.

Under `torchrun --nproc_per_node N -m pipeline.stages.train ...` the ranks train together (DDP,
pipeline/distributed.py); rank 0 alone logs and writes the checkpoint, history and resume file.
"""
import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import distributed
from pipeline.data.manifest import label_matrix, resolve_labels, rows
from pipeline.data.store import ArrayStore
from pipeline.data.transforms import NORMALISATION
from pipeline.feedback import shortcut_region
from pipeline.io import write_text
from pipeline.models.checkpoint import MODEL_FILE, file_sha256, load_model, save_model
from pipeline.models.freeze import apply_trainable
from pipeline.stages.common import cycle_arg, skip_if_stopped, stage_main
from pipeline.training import (RESUME_FILE, RightReasons, Rows, TrainSpec, baseline_model, baseline_spec, run_options,
                               start_fingerprint, train_classifier)

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    """One process, or one rank of a torchrun job (the process group lives as long as the stage).

    With `train.nproc_per_node` > 1 and no torchrun around it (`dvc repro`, the flow), this process
    launches torchrun on this very stage and cycle and exits with its status."""
    if args.cycle and not distributed.under_torchrun() and skip_if_stopped(
            params, paths, args.cycle, [paths.model(args.cycle), paths.train_history(args.cycle)]):
        return
    if params.train.nproc_per_node > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch("pipeline.stages.train", params.train.nproc_per_node,
                                    ["--cycle", str(args.cycle), "--params", str(Path(args.params).resolve()),
                                     "--root", str(Path(args.root).resolve())],
                                    params.compute.device, params.compute.threads))
    if distributed.setup(params.compute.device, params.compute.threads) and not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        _run(params, paths, args)
    finally:
        distributed.cleanup()


def _run(params, paths, args) -> None:
    k, tp = args.cycle, params.train
    manifest = pd.read_parquet(paths.manifest)
    labels = resolve_labels(params.data.labels, manifest)
    train_rows, val_rows = rows(manifest, "train"), rows(manifest, "val")
    images = ArrayStore(paths.images)
    y_train, y_val = label_matrix(manifest, labels)[train_rows], label_matrix(manifest, labels)[val_rows]
    raw_val = Rows(images, val_rows, y_val)
    select = raw_val
    if k == 0:
        model = baseline_model(tp, labels, params.data.image_size)
        arch, model_kwargs = tp.arch, dict(tp.model_kwargs)
        train_store, train_idx, parent = images, train_rows, None
        spec = baseline_spec(tp)
    else:
        prev = params.cycles[f"c{k}"].prev
        model, prev_meta = load_model(paths.model(prev))
        if prev_meta["labels"] != labels:
            raise ValueError(f"cycle {k}: labels {labels} differ from cycle {prev}'s {prev_meta['labels']}")
        # the parent's architecture and head, whatever params say now
        arch, model_kwargs = prev_meta["arch"], prev_meta.get("model_kwargs", {})
        if model_kwargs != tp.model_kwargs:
            log.warning("cycle %d keeps cycle %d's model_kwargs %s (params say %s)", k, prev, model_kwargs,
                        tp.model_kwargs)
        train_store = ArrayStore(paths.enhanced_train(k))
        if len(train_store) != len(train_rows):
            raise ValueError(f"enhanced set c{k} has {len(train_store)} images for {len(train_rows)} train rows")
        train_idx = np.arange(len(train_rows))
        if (paths.enhanced_val(k) / "index.json").is_file():
            select = Rows(ArrayStore(paths.enhanced_val(k)), np.arange(len(val_rows)), y_val)
        parent = {"cycle": prev, "sha256": file_sha256(paths.model(prev) / MODEL_FILE)}
        spec = TrainSpec(tp.finetune_epochs, tp.finetune_lr, tp.weight_decay, tp.batch_size, tp.seed + k, tp.augment)
    n_train, n_total = apply_trainable(model, tp.trainable_last_n, tp.trainable_blocks)
    trainable = {"last_n": tp.trainable_last_n, "blocks": tp.trainable_blocks, "params": n_train,
                 "total": n_total, "fraction": round(n_train / n_total, 6)}
    log.info("cycle %d: %d of %d parameters train (%.1f %%)", k, n_train, n_total, 100 * n_train / n_total)
    data_hash = hashlib.sha256((paths.images / "index.json").read_bytes()
                               + (train_store.root / "index.json").read_bytes()
                               + (select.store.root / "index.json").read_bytes()
                               + paths.manifest.read_bytes()).hexdigest()[:16]
    rrr = None
    if k and tp.rrr_weight > 0:
        region, n_boxes = shortcut_region(paths, params.data.image_size)
        if region is not None:
            rrr = RightReasons(tp.rrr_weight, region)
            log.info("cycle %d: right-for-the-right-reasons penalty %.3g over %d shortcut boxes (%.1f %% of the image)",
                     k, tp.rrr_weight, n_boxes, 100 * region.mean())
    resume_dir = paths.resume_dir(k)
    result = train_classifier(model, spec, labels, Rows(train_store, train_idx, y_train), select, resume_dir,
                              fingerprint_extra={"data": data_hash, "parent": parent,
                                                 **start_fingerprint(arch, model_kwargs, labels,
                                                                     tp.weights if k == 0 else None)},
                              calibrate=raw_val, rrr=rrr, **run_options(params))
    meta = {
        "arch": arch, "model_kwargs": model_kwargs, "trainable": trainable,
        "labels": labels, "image_size": params.data.image_size,
        "normalisation": NORMALISATION, "preprocessing": "grayscale uint8, resized to image_size, repeated to 3 channels",
        "cycle": k, "parent": parent, "data_hash": data_hash, "source": params.data.source,
        "enhance_policy": params.enhance.policy if k else None,
        "thresholds": result["thresholds"], "best_epoch": result["best_epoch"], "val_auroc": result["best_score"],
        "selected_on": "enhanced val" if select is not raw_val else "val",
        "epochs": spec.epochs, "lr": spec.lr, "seed": spec.seed, "world_size": distributed.world_size(),
        "rrr_weight": rrr.weight if rrr is not None else 0.0,
    }
    if distributed.is_main():
        save_model(paths.model(k), model, meta)
        hist = pd.DataFrame(result["history"])
        write_text(paths.train_history(k), hist.to_csv(index=False))
        (resume_dir / RESUME_FILE).unlink(missing_ok=True)
    distributed.barrier()
    log.info("cycle %d: best epoch %d, val AUROC %.4f", k, result["best_epoch"] + 1, result["best_score"])


if __name__ == "__main__":
    stage_main("train", run, cycle_arg)
