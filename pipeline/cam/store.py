"""A dataset's CAMs as a sharded float16 store, one task per shard (on whichever engine runs it).

Each task runs on the device `compute.device` resolves to where the task runs (a Dask worker's own
GPU for `auto`), always in fp32 (pipeline/cam/all_labels.py says why), and returns its maps on the CPU.
"""
from __future__ import annotations

import numpy as np

from pipeline.cam.all_labels import dataset_cams
from pipeline.compute import resolve_device
from pipeline.config import ComputeParams
from pipeline.data.dataset import iterate_batches
from pipeline.data.store import ArrayStore, write_store
from pipeline.engine import Engine, cached, file_key, shard_slices
from pipeline.models.checkpoint import MODEL_FILE, load_model


def cam_shard(model_dir: str, images_root: str, rows: np.ndarray, method: str, size: int | None,
              batch_size: int, compute: ComputeParams | None = None) -> np.ndarray:
    """Low-res float16 CAMs (len(rows), L, s, s) of the model in `model_dir` for `rows` of the store."""
    device = resolve_device(compute.device if compute is not None else "cpu")
    model, meta = cached(("model", *file_key(f"{model_dir}/{MODEL_FILE}"), str(device)),
                         lambda: load_model(model_dir, device))
    images = ArrayStore(images_root)
    batches = (x for x, _, _ in iterate_batches(images, rows, None, batch_size))
    return np.concatenate(list(dataset_cams(model, meta["arch"], batches, method, size)))


def write_cams(engine: Engine, model_dir, images_root, rows: np.ndarray, out_dir, method: str, size: int | None,
               batch_size: int, shard_size: int, attrs: dict, compute: ComputeParams | None = None) -> ArrayStore:
    """CAMs of `rows` into `out_dir` (aligned with `rows`); each shard of the output is one task."""
    tasks = ((str(model_dir), str(images_root), rows[s], method, size, batch_size, compute)
             for s in shard_slices(len(rows), shard_size))
    return write_store(out_dir, engine.map(cam_shard, tasks), np.float16, shard_size, attrs, progress="cam",
                       total=len(rows))
