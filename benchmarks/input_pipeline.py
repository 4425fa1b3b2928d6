"""Input-pipeline figures: how fast the training loader (pipeline/data/loader.py) delivers batches with
0, 1 or 2 worker processes, and what the workers do to a training step.

Why measure it: the workers read and augment while the model trains, so on a GPU machine they decide
whether the GPU waits for data; on this 2-core CPU they share the cores with the model's own threads,
so the gain is small. `make bench` (section `input_pipeline`) and `make bench-gpu` (benchmarks/gpu.py)
both time the loader with these functions.
"""
from __future__ import annotations

import logging
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from pipeline.compute import CPU, Compute, available_cores, grad_scaler, optimiser_step
from pipeline.config import AugmentParams
from pipeline.data import phantom
from pipeline.data.loader import EpochBatches, batch_loader, stop_workers
from pipeline.data.store import ArrayStore, ArrayStoreWriter
from pipeline.data.transforms import to_model_input
from pipeline.models.registry import create_model
from pipeline.training import masked_bce

log = logging.getLogger("benchmarks")


def phantom_store(root, n: int, size: int, distinct: int | None = None, shard_size: int = 128) -> ArrayStore:
    """`n` phantom films at `size` px: `distinct` rendered ones (default all), repeated, since reading and
    augmenting cost the same whatever the content and rendering is the slow part."""
    rng = np.random.default_rng(0)
    films = np.stack([phantom.render(rng, size, phantom.sample_patient(rng),
                                     {lab: bool(rng.random() < 0.3) for lab in phantom.PHANTOM_LABELS}, {}).image
                      for _ in range(min(n, distinct or n))])
    writer = ArrayStoreWriter(root, (size, size), np.uint8, shard_size=shard_size)
    for start in range(0, n, len(films)):
        writer.append(films[: min(len(films), n - start)])
    return writer.close()


def phantom_targets(n: int, labels: int, seed: int = 0) -> np.ndarray:
    """Random 0/1 targets (N, L): a training step's cost does not depend on them."""
    return (np.random.default_rng(seed).random((n, labels)) < 0.3).astype(np.float32)


def loader_rate(store: ArrayStore, targets: np.ndarray, batch: int, workers: int, epochs: int = 2,
                augment: AugmentParams | None = None, pin_memory: bool = False, seed: int = 0) -> dict:
    """Images/s the loader alone delivers with `workers` processes over `epochs` full epochs, after a warm-up
    epoch (its first batch, worker start-up included, is reported separately as `first_batch_s`)."""
    augment = AugmentParams() if augment is None else augment
    batches = EpochBatches(store.root, np.arange(len(store)), targets, batch, seed, augment)
    loader, sampler = batch_loader(batches, workers, pin_memory)
    try:
        t0 = time.perf_counter()
        sampler.set_epoch(0)
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        for _ in it:  # the rest of the warm-up epoch
            pass
        images, t1 = 0, time.perf_counter()
        for epoch in range(1, epochs + 1):
            sampler.set_epoch(epoch)
            for x, _, _ in loader:
                images += len(to_model_input(x))  # the trainer's share of the input pipeline
        wall = time.perf_counter() - t1
    finally:
        stop_workers(loader)
    return {"workers": workers, "first_batch_s": round(first, 3), "images_per_s": round(images / wall, 1),
            "timed_epochs": epochs, "timed_images": images}


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler, compute: Compute,
               x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step as pipeline/training.py takes it (autocast forward, masked BCE in fp32, a
    GradScaler under fp16); returns the loss, which waits for the device as the training loop's
    running loss does, so wall time around a step is the step's time."""
    with compute.autocast():
        logits = model(x)
    loss = masked_bce(logits.float(), y)
    optimiser_step(loss, opt, scaler)
    return float(loss.detach())


class _Trainer:
    """One model, its AdamW and its loader; `epoch` runs one epoch of `train_step`s and records each
    step's wait for its batch and its compute time (moving the batch to the device included)."""

    def __init__(self, model: torch.nn.Module, store: ArrayStore, targets: np.ndarray, batch: int, workers: int,
                 compute: Compute, augment: AugmentParams, seed: int = 0):
        self.model, self.compute, self.workers = model.to(compute.device).train(), compute, workers
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.scaler = grad_scaler(compute.device, compute.precision)
        on_gpu = compute.device.type == "cuda"
        batches = EpochBatches(store.root, np.arange(len(store)), targets, batch, seed, augment)
        self.loader, self.sampler = batch_loader(batches, workers, pin_memory=on_gpu)
        self.steps: list[tuple[float, float, int]] = []  # (wait s, compute s, images)

    def epoch(self, epoch: int) -> None:
        device = self.compute.device
        self.sampler.set_epoch(epoch)
        t = time.perf_counter()
        it = iter(self.loader)  # creating the iterator counts as waiting for the first batch
        for x, y, _ in it:
            t1 = time.perf_counter()
            x = to_model_input(x)
            if device.type != "cpu":
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            train_step(self.model, self.opt, self.scaler, self.compute, x, y)
            t2 = time.perf_counter()
            self.steps.append((t1 - t, t2 - t1, len(x)))
            t = t2

    def close(self) -> None:
        stop_workers(self.loader)

    def summary(self, warmup: int) -> dict:
        """Figures over the steps after the first `warmup` (worker start-up is in the first step's wait)."""
        timed = self.steps[warmup:]
        if not timed:
            raise ValueError(f"{len(self.steps)} steps, none left after a warm-up of {warmup}: train more epochs")
        wait = np.array([s[0] for s in timed])
        comp = np.array([s[1] for s in timed])
        images = sum(s[2] for s in timed)
        return {"workers": self.workers, "first_batch_s": round(self.steps[0][0], 3),
                "images_per_s": round(images / float((wait + comp).sum()), 1),
                "step_ms": round(float(np.median(wait + comp)) * 1000, 1),
                "wait_ms": round(float(wait.mean()) * 1000, 1), "compute_ms": round(float(comp.mean()) * 1000, 1),
                "wait_share": round(float(wait.sum() / (wait + comp).sum()), 3), "timed_steps": len(timed)}


def train_rates(make_model: Callable[[], torch.nn.Module], store: ArrayStore, targets: np.ndarray, batch: int,
                workers: tuple[int, ...], compute: Compute = CPU, epochs: int = 2, warmup: int = 2,
                augment: AugmentParams | None = None) -> dict:
    """Training figures with each worker count, one model (the same initial weights) per count.

    The counts train epoch by epoch in turn, so load from other processes on a shared machine falls on
    all of them alike; the first `warmup` steps of each are left out of the rates."""
    augment = AugmentParams() if augment is None else augment
    trainers = [_Trainer(make_model(), store, targets, batch, w, compute, augment) for w in workers]
    try:
        for epoch in range(epochs):
            for tr in trainers:
                tr.epoch(epoch)
    finally:
        for tr in trainers:
            tr.close()
    return {f"{tr.workers}_workers": tr.summary(warmup) for tr in trainers}


def bench_input_pipeline(n: int = 256, size: int = 224, batch: int = 32, workers: tuple[int, ...] = (0, 1, 2),
                         train_workers: tuple[int, ...] = (0, 2), arch: str = "tinyvgg", epochs: int = 2,
                         train_epochs: int = 2, warmup: int = 2) -> dict:
    """`make bench`'s input_pipeline section: loader images/s with each of `workers`, and training step
    time and images/s with each of `train_workers`, on a phantom store of `n` films at `size` px."""
    labels = len(phantom.PHANTOM_LABELS)
    augment = AugmentParams()
    targets = phantom_targets(n, labels)

    def make_model():
        torch.manual_seed(0)
        return create_model(arch, labels, image_size=size)

    with tempfile.TemporaryDirectory(prefix="cxr-bench-input-") as tmp:
        store = phantom_store(tmp, n, size, distinct=min(n, 64))
        loader = {f"{w}_workers": loader_rate(store, targets, batch, w, epochs, augment) for w in workers}
        log.info("input pipeline, loader alone: %s", loader)
        train = train_rates(make_model, store, targets, batch, train_workers, CPU, train_epochs, warmup, augment)
        log.info("input pipeline, training %s: %s", arch, train)
    out = {"image_size": size, "images": n, "batch_size": batch, "cores": available_cores(),
           "torch_threads": torch.get_num_threads(), "augment": augment.model_dump(),
           "loader": loader, "train": {"arch": arch, "labels": labels, **train}}
    lo, hi = f"{min(train_workers)}_workers", f"{max(train_workers)}_workers"
    ratio = round(train[hi]["images_per_s"] / train[lo]["images_per_s"], 3)
    out["train"][f"images_per_s_{hi}_over_{lo}"] = ratio
    out["targets"] = {f"train images_per_s_{hi}_over_{lo}": ">= 1.0"}
    out["meets_targets"] = ratio >= 1.0
    out["note"] = (f"loader: images/s over {epochs} full epochs after a warm-up epoch; first_batch_s is worker "
                   "start-up + the first batch. train: forward + backward + AdamW per step as pipeline/training.py "
                   "runs it, the worker counts trained epoch by epoch in turn; wait_ms is the time spent waiting for "
                   f"the next batch. On {available_cores()} cores the workers compete with the model's own threads "
                   "for the same cores, so the gain is small: decode + augmentation is a small part of a step. "
                   "Measured on a machine that may be shared: compare the counts with each other, not across runs.")
    return out
