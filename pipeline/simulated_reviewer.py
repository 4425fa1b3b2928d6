"""A simulated reviewer: marks written through the same store and validation as the viewer's, for
measurements a real reader panel would take weeks for.

- `markers`: on the phantom, the reviewer sees each film's planted marker (the "R" top-left, the token
  top-right: pipeline/viewer/warning_check.phantom_marker_box) and marks it as a shortcut on `n`
  training films. The enhancement then decorrelates that region on every film, and
  `train.rrr_weight` penalises the gradient inside it.
- `lungs`: the reviewer's evidence boxes for `label` are the bounding boxes of the U-Net's predicted
  lung fields on `n` test films. On real films (Kermany) this exercises `pointing_game_reviewed` end to
  end; it is a plumbing check, not a clinical result: the boxes are the model pipeline's own masks.

    python -m pipeline.simulated_reviewer markers --n 50
    python -m pipeline.simulated_reviewer lungs --n 100 --label Pneumonia
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd

from pipeline.config import Paths, load_params
from pipeline.data.manifest import resolve_labels, rows
from pipeline.data.record import decode_anatomy
from pipeline.data.store import ArrayStore
from pipeline.feedback import ReviewScope, append
from pipeline.io import read_json
from pipeline.models.checkpoint import MODEL_FILE, file_sha256
from pipeline.viewer.warning_check import MARKER_CORNERS, phantom_marker_box

log = logging.getLogger(__name__)

REVIEWER = "simulated"


def _scope(paths: Paths, params, split: str) -> tuple[pd.DataFrame, np.ndarray, ReviewScope, ArrayStore]:
    """The manifest, the split's rows, what a mark may name, and the prepared images."""
    manifest = pd.read_parquet(paths.manifest)
    idx = rows(manifest, split)
    labels = resolve_labels(params.data.labels, manifest)
    images = ArrayStore(paths.images)
    scope = ReviewScope(tuple(manifest["image_id"].astype(str).iloc[idx]), tuple(labels), images.item_shape[-1])
    return manifest, idx, scope, images


def _served(paths: Paths) -> tuple[str | None, int | None]:
    """The sha256 and cycle of the model the simulated reviewer 'saw' (the served one, when there is one)."""
    if not paths.latest.is_file():
        return None, None
    latest = read_json(paths.latest)
    weights = paths.root / latest["checkpoint"]
    return file_sha256(weights / MODEL_FILE if weights.is_dir() else weights), latest["cycle"]


def mark_markers(root: str = ".", n: int = 50, split: str = "train", seed: int = 0) -> int:
    """Mark the planted marker of `n` marked `split` films (drawn with `seed`) as a shortcut; returns the
    number of marks written."""
    paths, params = Paths(root), load_params(Paths(root).params)
    if params.data.source != "phantom":
        raise ValueError("the marker reviewer knows the phantom's markers only (data.source: phantom)")
    manifest, idx, scope, images = _scope(paths, params, split)
    marks = []
    for i in np.random.default_rng(seed).permutation(idx):
        image = images.read(np.asarray([i]))[0]
        boxes = [b for corner in MARKER_CORNERS.values() if (b := phantom_marker_box(image, corner))]
        if not boxes:
            continue
        marks.append({"image_id": str(manifest["image_id"].iloc[i]), "label": scope.labels[0], "call": "agree",
                      "heatmap": "shortcut", "boxes": [{"x": x, "y": y, "w": w, "h": h, "kind": "shortcut",
                                                        "what": "marker"} for x, y, w, h in boxes]})
        if len(marks) == n:
            break
    sha, cycle = _served(paths)
    append(paths, marks, reviewer=REVIEWER, model_sha256=sha, model_cycle=cycle, scope=scope)
    log.info("simulated reviewer: %d %s films' markers marked as shortcuts", len(marks), split)
    return len(marks)


def mark_lung_fields(root: str = ".", n: int = 100, label: str = "Pneumonia", split: str = "test") -> int:
    """Evidence boxes for `label` = the bounding box of each predicted lung on `n` films of `split`
    that are positive for it; returns the number of marks written."""
    paths, params = Paths(root), load_params(Paths(root).params)
    manifest, idx, scope, _ = _scope(paths, params, split)
    if label not in scope.labels:
        raise ValueError(f"{label!r} is not one of the model's labels {list(scope.labels)}")
    positive = idx[manifest[label].to_numpy()[idx] == 1][:n]
    masks = ArrayStore(paths.masks)
    marks = []
    for i in positive:
        lungs = decode_anatomy(masks.read(np.asarray([i])), "lungs")[0]
        half = lungs.shape[1] // 2
        boxes = []
        for x0, side in ((0, lungs[:, :half]), (half, lungs[:, half:])):
            ys, xs = np.nonzero(side)
            if len(ys):
                boxes.append({"x": int(xs.min() + x0), "y": int(ys.min()), "w": int(xs.max() - xs.min() + 1),
                              "h": int(ys.max() - ys.min() + 1), "kind": "evidence", "what": None})
        if boxes:
            marks.append({"image_id": str(manifest["image_id"].iloc[i]), "label": label, "call": "agree",
                          "heatmap": "finding", "boxes": boxes})
    sha, cycle = _served(paths)
    append(paths, marks, reviewer=REVIEWER, model_sha256=sha, model_cycle=cycle, scope=scope)
    log.info("simulated reviewer: lung-field evidence boxes for %s on %d %s films", label, len(marks), split)
    return len(marks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.simulated_reviewer", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("markers", "lungs"))
    parser.add_argument("--root", default=".")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--label", default="Pneumonia", help="lungs: the label the evidence boxes are for")
    parser.add_argument("--split", default=None, help="markers: train (default); lungs: test (default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.what == "markers":
        mark_markers(args.root, args.n, args.split or "train")
    else:
        mark_lung_fields(args.root, args.n, args.label, args.split or "test")


if __name__ == "__main__":
    main()
