"""Batches from an array store: images by store index, targets from the manifest's label matrix."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from pipeline.compute import CPU, Compute
from pipeline.data.store import ArrayStore
from pipeline.data.transforms import augment_batch, to_model_input


def iterate_batches(store: ArrayStore, indices: np.ndarray, targets: np.ndarray | None, batch_size: int,
                    generator: torch.Generator | None = None, transform=None,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, np.ndarray]]:
    """Yield (inputs, targets, store indices); shuffled when a generator is given.

    `targets` is aligned with `indices` ((len(indices), L), NaN = unknown label).
    Reading a shuffled batch touches several shards, but only one is mapped at a time.
    """
    order = (torch.randperm(len(indices), generator=generator).numpy() if generator is not None
             else np.arange(len(indices)))
    for start in range(0, len(order), batch_size):
        pos = order[start:start + batch_size]
        images = store.read(indices[pos])
        if transform is not None:
            images = augment_batch(transform, images)
        y = None if targets is None else torch.from_numpy(np.ascontiguousarray(targets[pos]))
        yield to_model_input(images), y, indices[pos]


@torch.no_grad()
def predict(model: torch.nn.Module, store: ArrayStore, indices: np.ndarray, batch_size: int = 128,
            compute: Compute = CPU) -> np.ndarray:
    """Sigmoid probabilities (len(indices), L) as float32 on the CPU, in the given order, model in eval mode.

    `model` must already be on `compute.device`; inputs go there, the forward runs under its autocast
    (bf16/fp16 logits are cast to float32 before the sigmoid, so thresholds and metrics see fp32)."""
    model.eval()
    outs = []
    for x, _, _ in iterate_batches(store, indices, None, batch_size):
        with compute.autocast():
            logits = model(x.to(compute.device, non_blocking=True))
        outs.append(torch.sigmoid(logits.float()).cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), dtype=np.float32)
