"""DVC stage `train`: cycle 0 from scratch on raw images; cycle K fine-tunes cycle K-1 on enhanced images.

Validation and model selection always use the unmodified val images.
"""
import hashlib
import logging

import pandas as pd
import torch

from pipeline.data.manifest import label_matrix, resolve_labels, rows
from pipeline.data.store import ArrayStore
from pipeline.data.transforms import NORMALISATION
from pipeline.io import write_text
from pipeline.models.checkpoint import file_sha256, load_model, save_model
from pipeline.models.registry import create_model
from pipeline.stages.common import cycle_arg, stage_main
from pipeline.training import RESUME_FILE, TrainSpec, train_classifier

log = logging.getLogger(__name__)


def run(params, paths, args) -> None:
    k, tp = args.cycle, params.train
    manifest = pd.read_parquet(paths.manifest)
    labels = resolve_labels(params.data.labels, manifest)
    train_rows, val_rows = rows(manifest, "train"), rows(manifest, "val")
    images = ArrayStore(paths.images)
    if k == 0:
        torch.manual_seed(tp.seed)
        model = create_model(tp.arch, len(labels), weights=tp.weights, image_size=params.data.image_size)
        train_store, train_idx, parent = images, train_rows, None
        spec = TrainSpec(tp.epochs, tp.lr, tp.weight_decay, tp.batch_size, tp.seed, tp.augment)
    else:
        prev = params.cycles[f"c{k}"].prev
        model, prev_meta = load_model(paths.model(prev))
        if prev_meta["labels"] != labels:
            raise ValueError(f"cycle {k}: labels {labels} differ from cycle {prev}'s {prev_meta['labels']}")
        train_store = ArrayStore(paths.enhanced(k))
        if len(train_store) != len(train_rows):
            raise ValueError(f"enhanced set c{k} has {len(train_store)} images for {len(train_rows)} train rows")
        train_idx = torch.arange(len(train_rows)).numpy()
        parent = {"cycle": prev, "sha256": file_sha256(paths.model(prev) / "model.safetensors")}
        spec = TrainSpec(tp.finetune_epochs, tp.finetune_lr, tp.weight_decay, tp.batch_size, tp.seed + k, tp.augment)
    data_hash = hashlib.sha256((paths.images / "index.json").read_bytes()
                               + (train_store.root / "index.json").read_bytes()
                               + paths.manifest.read_bytes()).hexdigest()[:16]
    y_train, y_val = label_matrix(manifest, labels)[train_rows], label_matrix(manifest, labels)[val_rows]
    resume_dir = paths.resume_dir(k)
    result = train_classifier(model, spec, labels, train_store, train_idx, y_train, images, val_rows, y_val,
                              resume_dir, fingerprint_extra={"data": data_hash, "parent": parent, "arch": tp.arch})
    meta = {
        "arch": tp.arch, "labels": labels, "image_size": params.data.image_size,
        "normalisation": NORMALISATION, "preprocessing": "grayscale uint8, resized to image_size, repeated to 3 channels",
        "cycle": k, "parent": parent, "data_hash": data_hash, "source": params.data.source,
        "enhance_policy": params.enhance.policy if k else None,
        "thresholds": result["thresholds"], "best_epoch": result["best_epoch"], "val_auroc": result["best_score"],
        "epochs": spec.epochs, "lr": spec.lr, "seed": spec.seed,
    }
    save_model(paths.model(k), model, meta)
    hist = pd.DataFrame(result["history"])
    write_text(paths.root / "reports" / "train" / f"c{k}" / "history.csv", hist.to_csv(index=False))
    (resume_dir / RESUME_FILE).unlink(missing_ok=True)
    log.info("cycle %d: best epoch %d, val AUROC %.4f", k, result["best_epoch"] + 1, result["best_score"])


if __name__ == "__main__":
    stage_main("train", run, cycle_arg)
