"""Sharded array stores: few files, bounded memory, no partial shard ever visible.

A store is a directory of `shard-NNNNN.npy` files plus `index.json`, written last. Each shard is
written to a temp file and `os.replace`d, so a killed writer leaves only complete shards and no
index; a reader refuses a store without an index. Reads memory-map shards, so iterating a store
of any size keeps memory flat.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from pipeline.io import atomic_path, read_json, write_json

INDEX = "index.json"
FORMAT = "cxr-array-store/1"


class StoreError(RuntimeError):
    pass


class ArrayStoreWriter:
    """Append items (fixed shape and dtype) and flush them as shards of `shard_size`."""

    def __init__(self, root: str | os.PathLike, item_shape: tuple[int, ...], dtype, shard_size: int = 512,
                 attrs: dict | None = None):
        self.root = Path(root)
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self.item_shape = tuple(int(s) for s in item_shape)
        self.dtype = np.dtype(dtype)
        self.shard_size = int(shard_size)
        self.attrs = dict(attrs or {})
        self._buf: list[np.ndarray] = []
        self._shards: list[dict] = []
        self._count = 0
        self._closed = False

    def append(self, batch: np.ndarray) -> None:
        """Append a batch of items, shape (n, *item_shape)."""
        batch = np.asarray(batch)
        if batch.shape[1:] != self.item_shape:
            raise StoreError(f"item shape {batch.shape[1:]} != store item shape {self.item_shape}")
        for item in batch.astype(self.dtype, copy=False):
            self._buf.append(item)
            if len(self._buf) == self.shard_size:
                self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        name = f"shard-{len(self._shards):05d}.npy"
        with atomic_path(self.root / name) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack(self._buf))
        self._shards.append({"file": name, "start": self._count, "count": len(self._buf)})
        self._count += len(self._buf)
        self._buf = []

    def close(self) -> "ArrayStore":
        """Flush the tail and write the index (the commit point). Returns a reader."""
        if not self._closed:
            self._flush()
            write_json(self.root / INDEX, {
                "format": FORMAT, "count": self._count, "item_shape": list(self.item_shape),
                "dtype": self.dtype.str, "shard_size": self.shard_size, "shards": self._shards,
                "attrs": self.attrs,
            })
            self._closed = True
        return ArrayStore(self.root)

    def __enter__(self) -> "ArrayStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class ArrayStore:
    """Read-only view of a closed store; `store[i]`, `store.read(indices)`, `iter_batches()`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index_path = self.root / INDEX
        if not index_path.is_file():
            raise StoreError(f"{self.root} is not a complete array store (no {INDEX}); re-run the stage that writes it")
        meta = read_json(index_path)
        if meta.get("format") != FORMAT:
            raise StoreError(f"{self.root}: unsupported store format {meta.get('format')!r}")
        self.count: int = meta["count"]
        self.item_shape = tuple(meta["item_shape"])
        self.dtype = np.dtype(meta["dtype"])
        self.shard_size: int = meta["shard_size"]
        self.attrs: dict = meta.get("attrs", {})
        self._shards = meta["shards"]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.item_shape)

    def _shard(self, k: int) -> np.ndarray:
        arr = self._cache.get(k)
        if arr is None:
            arr = np.load(self.root / self._shards[k]["file"], mmap_mode="r", allow_pickle=False)
            self._cache = {k: arr}  # keep one shard mapped: memory stays flat
        return arr

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.count:
            raise IndexError(f"index {i} out of range for store of {self.count}")
        k = i // self.shard_size
        return np.array(self._shard(k)[i - self._shards[k]["start"]])

    def read(self, indices) -> np.ndarray:
        """Items at `indices` as one array (in the order given)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.item_shape), dtype=self.dtype)
        order = np.argsort(indices // self.shard_size, kind="stable")
        for pos in order:
            out[pos] = self[indices[pos]]
        return out

    def iter_batches(self, batch_size: int, indices=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, items) batches; memory bounded by one shard plus one batch."""
        idx = np.arange(self.count) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            yield chunk, self.read(chunk)


def write_store(root: str | os.PathLike, batches: Iterable[np.ndarray], dtype, shard_size: int,
                attrs: dict | None = None, progress: str | None = None, total: int | None = None) -> ArrayStore:
    """Stream `batches` (n, *item_shape) into a new store whose item shape is the first batch's.
    Nothing is committed (no index) unless every batch arrives. `progress` names a progress bar over
    the `total` items, which moves as each batch (a shard task's result) arrives."""
    writer = None
    with tqdm(total=total, desc=progress, unit="img", leave=False, mininterval=5, disable=progress is None) as bar:
        for batch in batches:
            if writer is None:
                writer = ArrayStoreWriter(root, batch.shape[1:], dtype, shard_size, attrs)
            writer.append(batch)
            bar.update(len(batch))
    if writer is None:
        raise ValueError(f"{root}: nothing to store")
    return writer.close()
