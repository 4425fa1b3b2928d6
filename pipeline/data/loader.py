"""Training batches from the shard store through a torch DataLoader, the same for any number of workers.

Reading and augmenting run in `num_workers` processes while the model trains. Every batch is a pure
function of (epoch, batch number): the epoch's order comes from a generator seeded by (seed, epoch),
and the batch's augmentation from a seed of (seed, epoch, batch, rank). So
- 0, 1 or 8 workers yield identical batches (only who computes them differs);
- a run resumed at batch k of epoch e (pipeline/training.py) needs no generator state, only (e, k);
- under DDP every rank draws the same order and takes its own share of each global batch.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.store import ArrayStore
from pipeline.data.transforms import augment_batch, augmentation


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `n` rows in `epoch`: the same on every rank, worker and rerun."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1)[0]))
    return torch.randperm(n, generator=gen).numpy()


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The augmentation seed of one batch on one rank (albumentations takes a 32-bit seed)."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1)[0])


@dataclass
class EpochBatches(Dataset):
    """Item (epoch, b) is this rank's part of batch b of that epoch: (uint8 images, targets, store indices).

    Holds the store's path, not the open store: each worker maps the shards itself."""
    store_root: Path
    indices: np.ndarray
    targets: np.ndarray
    batch_size: int
    seed: int
    augment: object | None = None  # AugmentParams; None = no augmentation
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        self._store: ArrayStore | None = None
        self._order: tuple[int, np.ndarray] | None = None
        self._transform = None

    def __getstate__(self) -> dict:
        """What a worker receives: the parameters, not this process's open store or transform."""
        return {**self.__dict__, "_store": None, "_transform": None}

    def __len__(self) -> int:
        return max(1, -(-len(self.indices) // self.batch_size))

    def positions(self, epoch: int, batch: int) -> np.ndarray:
        """Rows (positions in `indices`) of batch `batch` of `epoch` that this rank trains on.

        A last batch smaller than the world lends some ranks a repeated row, so every rank steps as
        often (a rank with no batch would leave the others waiting in the gradient all-reduce)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.indices), self.seed, epoch))
        pos = self._order[1][batch * self.batch_size:(batch + 1) * self.batch_size]
        if self.world == 1:
            return pos
        return pos[self.rank::self.world] if len(pos) >= self.world else pos[[self.rank % len(pos)]]

    def __getitem__(self, key: tuple[int, int]):
        """uint8 images (N, H, W): a twelfth of the float32 3-channel input to send between processes;
        the trainer normalises them (pipeline.data.transforms.to_model_input)."""
        epoch, batch = key
        if self._store is None:
            self._store = ArrayStore(self.store_root)
        pos = self.positions(epoch, batch)
        images = self._store.read(self.indices[pos])
        if self.augment is not None:
            if self._transform is None:
                self._transform = augmentation(self.augment, self.seed)
            self._transform.set_random_seed(batch_seed(self.seed, epoch, batch, self.rank))
            images = augment_batch(self._transform, images)
        y = torch.from_numpy(np.ascontiguousarray(self.targets[pos]))
        return torch.from_numpy(np.ascontiguousarray(images)), y, self.indices[pos]


class EpochSampler(Sampler):
    """(epoch, b) for b from `start` to the end of the epoch; `set_epoch` moves it (it runs in the
    main process, so persistent workers need not be restarted)."""

    def __init__(self, n_batches: int):
        self.n_batches, self.epoch, self.start = n_batches, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.start, self.n_batches)])

    def __len__(self) -> int:
        return self.n_batches - self.start


def _worker_init(_worker_id: int) -> None:
    """The workers are the parallelism: OpenCV's own thread pool in each would only oversubscribe."""
    cv2.setNumThreads(0)


def worker_context() -> multiprocessing.context.BaseContext:
    """Where the workers come from: a fork server, a fresh single-threaded interpreter that imported this
    module once, not a fork of the trainer. A fork copies whatever the trainer's process holds, and two
    such copies broke workers: OpenCV's thread pool (a worker that touched it waited forever on
    threads that only exist in the parent) and Prefect 3.8's queue services, whose at-exit drain fails
    in the child after Prefect's own fork reset (every worker of a process that had run a flow exited
    with code 1 at shutdown; tests/test_training.py). Costs about 2 s once per process. Where there is
    no fork server (Windows), fresh interpreters (spawn)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def batch_loader(batches: EpochBatches, num_workers: int, pin_memory: bool = False) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader over `batches` (persistent workers, a few batches ahead) and the sampler that
    chooses its epoch and first batch."""
    sampler = EpochSampler(len(batches))
    extra = ({"persistent_workers": True, "prefetch_factor": 2, "worker_init_fn": _worker_init,
              "multiprocessing_context": worker_context()} if num_workers else {})
    # its own generator: creating an iterator must not draw from torch's global RNG (dropout's)
    loader = DataLoader(batches, batch_size=None, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(batches.seed), **extra)
    return loader, sampler


def stop_workers(loader: DataLoader) -> list[int]:
    """End a loader's persistent workers now, not when the garbage collector gets to them (DataLoader
    offers no public call for this); returns their exit codes (0 each for a clean shutdown)."""
    it = getattr(loader, "_iterator", None)
    workers = list(getattr(it, "_workers", []))
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None
    return [w.exitcode for w in workers]
