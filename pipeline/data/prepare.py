"""Turn a source's records into the prepared contract: manifest, boxes, image and mask stores, grid."""
from __future__ import annotations

import importlib
import logging
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import Params, Paths
from pipeline.data.labels import CANONICAL_LABELS
from pipeline.data.manifest import BOX_COLUMNS, validate_manifest
from pipeline.data.record import Quarantined, Record, materialise
from pipeline.data.sources.common import id_salt
from pipeline.data.store import ArrayStoreWriter
from pipeline.engine import Engine, open_engine
from pipeline.io import write_json, write_parquet, write_text

log = logging.getLogger(__name__)

GRID_MAX = 100  # fixed test images shown per cycle, chosen once here


def write_quarantine(path, items: list[Quarantined]) -> None:
    """reports/quarantine.csv: one row per unusable file (header only when there is none)."""
    frame = pd.DataFrame([(q.source_path, q.reason) for q in items], columns=["source_path", "reason"])
    write_text(path, frame.to_csv(index=False))


def source_module(name: str):
    """The adapter module for `data.source` (one module per dataset under pipeline/data/sources)."""
    try:
        return importlib.import_module(f"pipeline.data.sources.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"pipeline.data.sources.{name}":
            raise ValueError(f"data.source: no adapter for {name!r} in this version") from None
        raise


def _choose_grid(manifest: pd.DataFrame, labels: list[str], seed: int) -> list[str]:
    """Up to GRID_MAX test images, taking one positive of each label in turn, so that any prefix
    of the grid shows every label; negatives fill the rest."""
    test = manifest[manifest["split"] == "test"]
    rng = np.random.default_rng(seed)
    pools = []
    for label in labels:
        pos = test[test[label] == 1.0]["image_id"].tolist()
        rng.shuffle(pos)
        pools.append(pos)
    chosen: list[str] = []
    while len(chosen) < GRID_MAX and any(pools):
        for pool in pools:
            while pool and pool[0] in chosen:
                pool.pop(0)
            if pool and len(chosen) < GRID_MAX:
                chosen.append(pool.pop(0))
    rest = [i for i in test["image_id"].tolist() if i not in set(chosen)]
    rng.shuffle(rest)
    return (chosen + rest)[:GRID_MAX]


def load_chunk(items: list) -> list[Record | Quarantined]:
    """One task: a chunk of a source's stream with its pixels read."""
    return list(materialise(items))


def loaded(engine: Engine, items: Iterable, chunk: int) -> Iterator[Record | Quarantined]:
    """A source's stream, loaded `chunk` items per task on `engine`, in the source's order."""
    def tasks():
        buf = []
        for item in items:
            buf.append(item)
            if len(buf) == chunk:
                yield (buf,)
                buf = []
        if buf:
            yield (buf,)

    for result in engine.map(load_chunk, tasks()):
        yield from result


def prepare(params: Params, paths: Paths) -> dict:
    """Write every prepared artefact and reports/quarantine.csv; returns a small summary."""
    module = source_module(params.data.source)
    size = params.data.image_size
    rows: list[dict] = []
    boxes: list[tuple] = []
    quarantined: list[Quarantined] = []
    images = ArrayStoreWriter(paths.prepared_images, (size, size), np.uint8, params.data.shard_size,
                              attrs={"source": params.data.source})
    masks = None
    with open_engine(params.engine, params.compute.device) as engine:
        for rec in tqdm(loaded(engine, module.records(params, id_salt(paths.root)), params.data.shard_size),
                        desc="prepare", unit="img", leave=False, mininterval=5):
            if isinstance(rec, Quarantined):
                log.warning("quarantined %s: %s", rec.source_path, rec.reason)
                quarantined.append(rec)
                continue
            rec: Record
            if rec.image.shape != (size, size) or rec.image.dtype != np.uint8:
                raise ValueError(f"source {params.data.source} yielded {rec.image.shape}/{rec.image.dtype} "
                                 f"for {rec.image_id}; expected ({size}, {size}) uint8")
            images.append(rec.image[None])
            if rec.anatomy is not None:
                if masks is None:
                    if rows:
                        raise ValueError("a source must give anatomy masks for every image or for none")
                    masks = ArrayStoreWriter(paths.gt_masks, (size, size), np.uint8, params.data.shard_size)
                masks.append(rec.anatomy[None])
            elif masks is not None:
                raise ValueError(f"{rec.image_id} has no anatomy mask but earlier images had one")
            row = {"image_id": rec.image_id, "patient_id": rec.patient_id, "split": rec.split,
                   "source_path": rec.source_path, "view": rec.view}
            row.update({label: rec.labels.get(label, np.nan) for label in CANONICAL_LABELS})
            row.update(rec.meta)
            rows.append(row)
            boxes += [(rec.image_id, *box) for box in rec.boxes]
    write_quarantine(paths.quarantine, quarantined)
    if not rows:
        raise ValueError(f"data.source {params.data.source!r} yielded no usable images "
                         f"({len(quarantined)} quarantined, see {paths.quarantine})")
    manifest = validate_manifest(pd.DataFrame(rows))
    for label in CANONICAL_LABELS:
        manifest[label] = manifest[label].astype("float32")
    images.close()
    if masks is not None:
        masks.close()
    write_parquet(paths.boxes, pd.DataFrame(boxes, columns=list(BOX_COLUMNS)))
    labels = params.data.labels or [lab for lab in CANONICAL_LABELS if manifest[lab].notna().any()]
    write_json(paths.grid, {"image_ids": _choose_grid(manifest, labels, params.data.seed)})
    write_parquet(paths.prepared_manifest, manifest)  # last: the manifest marks the stage complete
    summary = {
        "n_images": len(manifest), "n_patients": int(manifest["patient_id"].nunique()),
        "splits": manifest["split"].value_counts().to_dict(),
        "positives": {lab: int((manifest[lab] == 1).sum()) for lab in labels},
        "has_gt_masks": masks is not None, "n_boxes": len(boxes), "quarantined": len(quarantined),
    }
    log.info("prepared %s", summary)
    return summary
