"""Classifier training: masked multi-label BCE, AdamW + cosine schedule, best-on-val, resumable mid-epoch.

Only parameters with `requires_grad` are optimised (partial fine-tuning, pipeline/models/freeze.py);
BatchNorm layers that are wholly frozen stay in eval mode while the rest trains.

Batches come from a DataLoader (pipeline/data/loader.py) whose workers read and augment; each batch is
a pure function of (epoch, batch number), so the worker count changes nothing but speed. Forward
passes run on `compute.device` under `compute.precision` (autocast; fp16 with a GradScaler).

Unknown labels (NaN) contribute no loss. At the end of every epoch, and every `checkpoint_every`
optimiser steps within one, the full training state (weights, optimiser, schedule, dropout RNG,
the position in the epoch, history, best weights) is written atomically to a resume file, so a killed
run continues from its last resume point and ends byte-identical to an uninterrupted one (on the CPU).

Under `torchrun` (pipeline/distributed.py) the model is wrapped in DistributedDataParallel: every
rank draws the same shuffled order and trains on its share of each global batch (so the effective
batch, the step count and the schedule stay those of one process), validation and selection agree
on every rank, and only rank 0 writes the resume file; every rank resumes from it.
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

from pipeline import distributed
from pipeline.compute import CPU, Compute, grad_scaler, optimiser_step
from pipeline.data.dataset import predict
from pipeline.data.loader import EpochBatches, batch_loader
from pipeline.data.store import ArrayStore
from pipeline.data.transforms import to_model_input
from pipeline.metrics.classification import choose_thresholds, classification_metrics
from pipeline.io import remove_stale_temps
from pipeline.models.checkpoint import CheckpointError, file_sha256, load_tensors, save_tensors
from pipeline.models.freeze import freeze_norms
from pipeline.models.registry import create_model

log = logging.getLogger(__name__)

RESUME_FILE = "state.safetensors"
RESUME_FORMAT = 2  # 2: per-(epoch, batch) seeds and mid-epoch resume points; older files are not continued
# one row of the training history, in this order (the columns of reports/train/cK/history.csv)
HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_score", "lr")


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


def start_fingerprint(arch: str, model_kwargs: dict, labels: list[str], weights: str | None) -> dict:
    """What a run's starting point depends on, for its resume fingerprint (`fingerprint_extra`).

    The labels, in order, are the head's outputs: the same count under other names or in another
    order would otherwise continue the old state silently. `weights` (`train.weights`, for a run
    that starts from it; None for one that starts from a parent checkpoint, whose hash names it) is
    identified by its content, so a file replaced in place is other weights too. The train stage and
    the label-permutation twin (pipeline/sanity_checks.py) both key their resume state with this."""
    return {"arch": arch, "model_kwargs": model_kwargs, "labels": list(labels),
            "weights": file_sha256(weights) if weights else None}


def baseline_model(tp, labels: list[str], image_size: int) -> nn.Module:
    """Cycle 0's starting point, the same weights every time: the registry's model built under `tp.seed`.

    `tp` is the `train` section of params (pipeline.config.TrainParams). `labels` name the outputs, so
    weights whose head names its own (torchxrayvision) hand over the rows of the labels both have.
    The caller's RNG is left as it was. The train stage and the label-permutation sanity check's twin
    both start here.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tp.seed)
        return create_model(tp.arch, len(labels), weights=tp.weights, image_size=image_size, labels=labels,
                            **tp.model_kwargs)


def run_options(params) -> dict:
    """How (not what) a run trains, from params: device and precision, loader workers, resume points.
    The train stage and the label-permutation twin pass these to `train_classifier`."""
    return {"compute": Compute.from_params(params.compute), "num_workers": params.train.num_workers,
            "checkpoint_every": params.train.checkpoint_every_steps}


def baseline_spec(tp, epochs: int | None = None) -> TrainSpec:
    """Cycle 0's training schedule (optionally with another number of epochs)."""
    return TrainSpec(epochs or tp.epochs, tp.lr, tp.weight_decay, tp.batch_size, tp.seed, tp.augment)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over known (non-NaN) labels only."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[known], targets[known])


@dataclass
class RightReasons:
    """Right for the right reasons (Ross et al., 2017): `weight` times the squared input gradient of the
    summed log-probabilities inside `region` (bool (S, S): the clinicians' shortcut boxes,
    pipeline.feedback.shortcut_region), per image. A model that reads a marked shortcut pays for it.
    Costs a second backward pass (double backprop) on every step."""
    weight: float
    region: np.ndarray

    def penalty(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_probs = nn.functional.logsigmoid(logits.float()).sum()
        (grad,) = torch.autograd.grad(log_probs, x, create_graph=True)
        region = torch.as_tensor(self.region, dtype=grad.dtype, device=grad.device)
        return self.weight * (grad.pow(2) * region).sum() / len(x)


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


def _read_resume(path: Path, fingerprint: str, model: nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler) -> tuple[dict, dict] | None:
    """(tensors, metadata) of the resume file when this run can continue from it, else None.

    A file from another configuration is ignored (an info line). One that cannot be read (truncated,
    not safetensors, checksum wrong) or whose content is not this model's and optimiser's state is
    discarded with a warning: the file only caches finished epochs, so training from scratch is
    right, where raising would fail the stage on every rerun until someone deleted it by hand. The
    next finished epoch overwrites it. Nothing is loaded into the model before all of it checks out.
    """
    main = distributed.is_main()
    try:
        tensors, meta = load_tensors(path)
    except CheckpointError as err:
        if main:
            log.warning("discarding the resume state: %s; training from scratch", err)
        return None
    if meta.get("fingerprint") != fingerprint:
        if main:
            log.info("ignoring resume state %s from a different configuration; training from scratch", path)
        return None
    problem = _resume_problem(tensors, meta, model, opt, sched)
    if problem is not None:
        if main:
            log.warning("discarding the resume state %s: %s; training from scratch", path, problem)
        return None
    return tensors, meta


def _shapes(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}


def _same_kind(saved, live) -> bool:
    """Whether a JSON value read back has the structure of a live one (tuples come back as lists)."""
    if isinstance(live, bool) or isinstance(saved, bool):
        return type(saved) is type(live)
    if isinstance(live, (int, float)):
        return isinstance(saved, (int, float))
    if isinstance(live, dict):
        return isinstance(saved, dict) and saved.keys() == live.keys() and all(
            _same_kind(saved[k], live[k]) for k in live)
    if isinstance(live, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(live) and all(map(_same_kind, saved, live))
    return live is None and saved is None or type(saved) is type(live)


def _resume_problem(tensors: dict[str, torch.Tensor], meta: dict, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler) -> str | None:
    """Why a resume file whose fingerprint matches still cannot be continued, or None."""
    return _tensors_problem(tensors, model, opt) or _settings_problem(meta, opt, sched)


def _tensors_problem(tensors: dict[str, torch.Tensor], model: nn.Module, opt: torch.optim.Optimizer) -> str | None:
    """Weights, optimiser state and generator states that are not this run's (names, shapes)."""
    live = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for part in ("model", "best"):
        if _shapes(tensors, f"{part}.") != live:
            return f"its {part} weights are not this model's (names or shapes differ)"
    params = [p for group in opt.param_groups for p in group["params"]]
    names: dict[str, set] = {}
    for key, shape in _shapes(tensors, "opt.").items():
        pid, _, name = key.partition(".")
        if not pid.isdigit() or int(pid) >= len(params):
            return f"optimiser state {key!r} names no parameter"
        if shape != (() if name == "step" else tuple(params[int(pid)].shape)):
            return f"optimiser state {key!r} has shape {shape}"
        names.setdefault(pid, set()).add(name)
    if len({frozenset(v) for v in names.values()}) > 1:
        return "its optimiser state is incomplete"
    dropout = tuple(torch.get_rng_state().shape)
    rngs = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("rng.") and v.dtype == torch.uint8}
    if rngs.get("rng.torch") != dropout or any(
            shape != dropout for k, shape in rngs.items() if k.startswith("rng.torch.")):
        return "its random generator states are missing or malformed"
    return None


def _settings_problem(meta: dict, opt: torch.optim.Optimizer,
                      sched: torch.optim.lr_scheduler.LRScheduler) -> str | None:
    """Optimiser and schedule settings, epoch, history and best score that this run cannot take up."""
    if not _same_kind(meta.get("param_groups"), opt.state_dict()["param_groups"]) \
            or not _same_kind(meta.get("sched"), sched.state_dict()):
        return "its optimiser or schedule settings are malformed"
    epoch, history, step = meta.get("epoch"), meta.get("history"), meta.get("step")
    ints = (epoch, step, meta.get("best_epoch"))
    if not (all(isinstance(v, int) and not isinstance(v, bool) for v in ints) and epoch >= -1 and step >= 0
            and isinstance(history, list) and len(history) == epoch + 1
            and all(isinstance(row, dict) and set(HISTORY_KEYS) <= row.keys() for row in history)
            and (isinstance(meta.get("best_score"), (int, float)) or epoch == -1 and meta.get("best_score") is None)):
        return "its epoch, history or best score is malformed"
    totals = meta.get("totals")
    if not (isinstance(totals, list) and len(totals) == distributed.world_size()
            and all(_same_kind(t, [0.0, 0]) for t in totals)):
        return "its running loss totals are malformed (or from another number of ranks)"
    return None


def train_classifier(model: nn.Module, spec: TrainSpec, labels: list[str], train: Rows, select: Rows,
                     resume_dir: Path, fingerprint_extra: dict | None = None, calibrate: Rows | None = None,
                     keep_last: bool = False, compute: Compute = CPU, num_workers: int = 0,
                     checkpoint_every: int = 0, rrr: "RightReasons | None" = None) -> dict:
    """Train in place and load the weights that score best on `select` into `model`.

    Operating thresholds are chosen on `calibrate` (default: `select`), the images the model will
    meet. `keep_last`: keep the last epoch's weights instead (`select` is still scored every epoch).
    `num_workers` DataLoader processes read and augment (the batches do not depend on it);
    `checkpoint_every` > 0 writes a resume point every that many steps within an epoch. `rrr` adds
    the right-for-the-right-reasons penalty (RightReasons).
    Returns {"history": [...per epoch...], "best_epoch", "best_score", "thresholds"}.
    """
    # dropout draws from torch's global generator: seed it from the spec inside a fork, so a run is
    # reproducible whatever ran before in the process, and the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + distributed.rank())  # dropout differs between ranks, reproducibly
        return _train(model, spec, labels, train, select, resume_dir, fingerprint_extra, calibrate, keep_last,
                      compute, num_workers, checkpoint_every, rrr)


def _train(model: nn.Module, spec: TrainSpec, labels: list[str], train: Rows, select: Rows, resume_dir: Path,
           fingerprint_extra: dict | None, calibrate: Rows | None, keep_last: bool, compute: Compute,
           num_workers: int, checkpoint_every: int, rrr: "RightReasons | None" = None) -> dict:
    calibrate = calibrate or select
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter is trainable")
    # the optimiser's state is indexed by position among the trainable parameters: a resume file
    # from another freeze setting must not be loaded
    frozen_key = hashlib.sha256("\n".join(trainable).encode()).hexdigest()[:16]
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    # another world size shards the data differently: its resume state does not continue this run
    sharding = {"world_size": world} if world > 1 else {}
    precision = {"precision": compute.precision} if compute.precision != "fp32" else {}
    fingerprint = spec.fingerprint({**(fingerprint_extra or {}), "trainable": frozen_key, **sharding, **precision,
                                    "resume_format": RESUME_FORMAT, **({"keep_last": True} if keep_last else {}),
                                    **({"rrr": [rrr.weight, hashlib.sha256(np.packbits(rrr.region)).hexdigest()[:16]]}
                                       if rrr is not None else {})})
    # under DDP each rank has its own GPU (cuda:LOCAL_RANK) or the CPU, as the backend chose
    device = distributed.device() if world > 1 else compute.device
    if device.type != "cpu":
        model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                            weight_decay=spec.weight_decay)
    batches = EpochBatches(train.store.root, train.idx, train.targets, spec.batch_size, spec.seed, spec.augment,
                           rank, world)
    steps_per_epoch = len(batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs * steps_per_epoch)
    scaler = grad_scaler(device, compute.precision)
    history: list[dict] = []
    best = {"score": -float("inf"), "epoch": -1, "state": None}
    start_epoch, start_step, totals = 0, 0, (0.0, 0)

    resume_path = Path(resume_dir) / RESUME_FILE
    if main:
        remove_stale_temps(resume_dir)
    distributed.barrier()
    saved = _read_resume(resume_path, fingerprint, model, opt, sched) if resume_path.is_file() else None
    if saved is not None:
        tensors, meta = saved
        opt.load_state_dict(_opt_from_tensors({k: v for k, v in tensors.items() if k.startswith("opt.")},
                                              meta["param_groups"]))
        sched.load_state_dict(meta["sched"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        model.load_state_dict({k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model.")})
        torch.set_rng_state(tensors.get(f"rng.torch.{rank}", tensors["rng.torch"]) if rank else tensors["rng.torch"])
        # the resume file's JSON metadata has sorted keys: rows get their order back, so a resumed
        # run's history (and history.csv) is byte-identical to an uninterrupted run's
        history = [{k: row[k] for k in HISTORY_KEYS} for row in meta["history"]]
        start_epoch, start_step = meta["epoch"] + 1, meta["step"]
        totals = tuple(meta["totals"][rank])
        best = {"score": meta["best_score"] if meta["best_score"] is not None else -float("inf"),
                "epoch": meta["best_epoch"],
                "state": {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} if meta["epoch"] >= 0 else None}
        if main:
            log.info("resuming from epoch %d, step %d of %d (%s)", start_epoch, start_step, steps_per_epoch,
                     resume_path)

    def save_resume(epoch_done: int, step: int, running: tuple[float, int]) -> None:
        """Write the resume point: `epoch_done` epochs' history complete, `step` batches into the next."""
        torch_rngs = distributed.all_gather_object(torch.get_rng_state())  # dropout state of every rank
        all_totals = distributed.all_gather_object(list(running))
        if main:
            opt_tensors, groups = _opt_to_tensors(opt)
            state = {k: v.detach() for k, v in model.state_dict().items()}
            save_tensors(resume_path, {
                **{f"model.{k}": v for k, v in state.items()},
                # before the first epoch's end there is no best yet: its place holds a copy (never loaded)
                **{f"best.{k}": v for k, v in (best["state"] or {k: v.clone() for k, v in state.items()}).items()},
                **opt_tensors, "rng.torch": torch_rngs[0],
                **{f"rng.torch.{r}": s for r, s in enumerate(torch_rngs) if r},
            }, {"fingerprint": fingerprint, "epoch": epoch_done, "step": step, "totals": all_totals,
                "history": history, "param_groups": groups, "sched": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "best_score": best["score"] if best["state"] is not None else None, "best_epoch": best["epoch"]})
        distributed.barrier()

    # DDP averages the ranks' gradients in backward; `model` stays the plain module (saved keys unprefixed)
    net = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    on_device = Compute(device, compute.precision)  # this rank's device (DDP) for validation and calibration
    loader, sampler = batch_loader(batches, num_workers, pin_memory=device.type == "cuda")
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        freeze_norms(model)
        first = start_step if epoch == start_epoch else 0
        total, n = totals if epoch == start_epoch else (0.0, 0)
        sampler.set_epoch(epoch, first)
        for step, (x, y, _) in enumerate(tqdm(loader, total=steps_per_epoch, initial=first, unit="batch",
                                              desc=f"epoch {epoch + 1}/{spec.epochs}", leave=False,
                                              mininterval=5, disable=not main), start=first):
            x = to_model_input(x)
            if device.type != "cpu":
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if rrr is not None:
                x.requires_grad_(True)
            with compute.autocast():
                logits = net(x)
            loss = masked_bce(logits.float(), y)
            if rrr is not None:
                loss = loss + rrr.penalty(logits, x)
            optimiser_step(loss, opt, scaler)
            sched.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps_per_epoch:
                save_resume(epoch - 1, step + 1, (total, n))
        if world > 1:
            # BatchNorm statistics last moved with each rank's own batch: take rank 0's, so every rank
            # validates, selects and calibrates the same weights
            distributed.broadcast_buffers(model)
            total, n = map(sum, zip(*distributed.all_gather_object((total, n))))
        probs = predict(model, select.store, select.idx, spec.batch_size * 2, on_device)
        score, val_loss = distributed.broadcast_object(_val_score(select.targets, probs, labels))
        row = dict(zip(HISTORY_KEYS, (epoch, total / max(n, 1), val_loss, score, sched.get_last_lr()[0])))
        history.append(row)
        if main:
            log.info("epoch %d/%d train_loss %.4f val_loss %.4f val_auroc %.4f", epoch + 1, spec.epochs,
                     row["train_loss"], val_loss, score)
        if score > best["score"] or keep_last:
            best = {"score": score, "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        save_resume(epoch, 0, (0.0, 0))

    model.load_state_dict(best["state"])
    probs = predict(model, calibrate.store, calibrate.idx, spec.batch_size * 2, on_device)
    thresholds = choose_thresholds(calibrate.targets, probs)
    if device.type != "cpu":
        model.to("cpu")  # callers save and evaluate on the CPU
    return {"history": history, "best_epoch": best["epoch"], "best_score": best["score"],
            "thresholds": [float(t) for t in thresholds]}
