"""Classifier training: masked multi-label BCE, AdamW + cosine schedule, best-on-val, resumable.

Only parameters with `requires_grad` are optimised (partial fine-tuning, pipeline/models/freeze.py);
BatchNorm layers that are wholly frozen stay in eval mode while the rest trains.

Unknown labels (NaN) contribute no loss. After every epoch the full training state (weights,
optimiser, schedule, RNG, history, best weights) is written atomically to a resume file, so a
killed run continues from its last finished epoch and ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.dataset import iterate_batches, predict
from pipeline.data.store import ArrayStore
from pipeline.data.transforms import augmentation
from pipeline.metrics.classification import choose_thresholds, classification_metrics
from pipeline.io import remove_stale_temps
from pipeline.models.checkpoint import load_tensors, save_tensors
from pipeline.models.freeze import freeze_norms

log = logging.getLogger(__name__)

RESUME_FILE = "state.safetensors"


@dataclass(frozen=True)
class Rows:
    """Images of one split: a store, the store indices to use, their targets (N, L; NaN = unknown)."""
    store: ArrayStore
    idx: np.ndarray
    targets: np.ndarray


@dataclass
class TrainSpec:
    """Everything one training run needs besides the data."""
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    seed: int
    augment: object  # AugmentParams

    def fingerprint(self, extra: dict) -> str:
        blob = json.dumps({**self.__dict__, "augment": self.augment.model_dump(), **extra},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over known (non-NaN) labels only."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])


def _val_score(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """(selection score, val loss): macro AUROC when defined, else negative loss."""
    known = ~np.isnan(y_true)
    p = np.clip(probs[known], 1e-6, 1 - 1e-6)
    t = y_true[known]
    loss = float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()) if known.any() else float("nan")
    auroc = classification_metrics(y_true, probs, np.full(len(labels), 0.5), labels)["auroc_macro"]
    return (auroc if auroc is not None else -loss), loss


def _opt_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {f"opt.{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _opt_from_tensors(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": groups}


def train_classifier(model: nn.Module, spec: TrainSpec, labels: list[str], train: Rows, select: Rows,
                     resume_dir: Path, fingerprint_extra: dict | None = None, calibrate: Rows | None = None) -> dict:
    """Train in place and load the weights that score best on `select` into `model`.

    Operating thresholds are chosen on `calibrate` (default: `select`), the images the model will
    meet. Returns {"history": [...per epoch...], "best_epoch", "best_score", "thresholds"}.
    """
    # dropout draws from torch's global generator: seed it from the spec inside a fork, so a run is
    # reproducible whatever ran before in the process, and the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _train(model, spec, labels, train, select, resume_dir, fingerprint_extra, calibrate)


def _train(model: nn.Module, spec: TrainSpec, labels: list[str], train: Rows, select: Rows, resume_dir: Path,
           fingerprint_extra: dict | None, calibrate: Rows | None) -> dict:
    train_store, train_idx, train_targets = train.store, train.idx, train.targets
    calibrate = calibrate or select
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable")
    # the optimiser's state is indexed by position among the trainable parameters: a resume file
    # from another freeze setting must not be loaded
    frozen_key = hashlib.sha256("\n".join(trainable).encode()).hexdigest()[:16]
    fingerprint = spec.fingerprint({**(fingerprint_extra or {}), "trainable": frozen_key})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                            weight_decay=spec.weight_decay)
    steps_per_epoch = max(1, -(-len(train_idx) // spec.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed)
    transform = augmentation(spec.augment, spec.seed)
    history: list[dict] = []
    best = {"score": -float("inf"), "epoch": -1, "state": None}
    start_epoch = 0

    resume_path = Path(resume_dir) / RESUME_FILE
    remove_stale_temps(resume_dir)
    if resume_path.is_file():
        tensors, meta = load_tensors(resume_path)
        if meta.get("fingerprint") == fingerprint:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            opt.load_state_dict(_opt_from_tensors({k: v for k, v in tensors.items() if k.startswith("opt.")},
                                                  meta["param_groups"]))
            sched.load_state_dict(meta["sched"])
            gen.set_state(tensors["rng.shuffle"])
            torch.set_rng_state(tensors["rng.torch"])
            history, start_epoch = meta["history"], meta["epoch"] + 1
            best = {"score": meta["best_score"], "epoch": meta["best_epoch"],
                    "state": {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}}
            log.info("resuming from epoch %d (%s)", start_epoch, resume_path)
        else:
            log.info("ignoring resume state from a different configuration")

    for epoch in range(start_epoch, spec.epochs):
        transform.set_random_seed(spec.seed * 1000 + epoch)
        model.train()
        freeze_norms(model)
        total, n = 0.0, 0
        batches = iterate_batches(train_store, train_idx, train_targets, spec.batch_size, gen, transform)
        for x, y, _ in tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{spec.epochs}",
                            unit="batch", leave=False, mininterval=5):
            loss = masked_bce(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
        probs = predict(model, select.store, select.idx, spec.batch_size * 2)
        score, val_loss = _val_score(select.targets, probs, labels)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss, "val_score": score,
               "lr": sched.get_last_lr()[0]}
        history.append(row)
        log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_auroc %.4f", epoch + 1, spec.epochs,
                 row["train_loss"], val_loss, score)
        if score > best["score"]:
            best = {"score": score, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        opt_tensors, groups = _opt_to_tensors(opt)
        save_tensors(resume_path, {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"best.{k}": v for k, v in best["state"].items()},
            **opt_tensors, "rng.shuffle": gen.get_state(), "rng.torch": torch.get_rng_state(),
        }, {"fingerprint": fingerprint, "epoch": epoch, "history": history, "param_groups": groups,
            "sched": sched.state_dict(), "best_score": best["score"], "best_epoch": best["epoch"]})

    model.load_state_dict(best["state"])
    probs = predict(model, calibrate.store, calibrate.idx, spec.batch_size * 2)
    thresholds = choose_thresholds(calibrate.targets, probs)
    return {"history": history, "best_epoch": best["epoch"], "best_score": best["score"],
            "thresholds": [float(t) for t in thresholds]}
