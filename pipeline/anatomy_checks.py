"""Is a predicted anatomy mask plausible? Post-processing, checks, and the safe fallback.

A U-Net trained on adult films (JSRT) meets paediatric ones (Kermany) with a domain gap; a broken
mask would quietly corrupt both the anatomy scores and the enhancement, so every predicted mask is
cleaned and checked, and the result travels with the mask store (`plausibility.parquet`, one row
per store row, and `prior.npy`, written beside the shards by the segment stage).

Post-processing: keep the two largest lung components and the largest heart component (specks
and blobs outside the chest go; the films that lost any are counted).

Checks, on the cleaned mask: exactly two lung components of meaningful size (MIN_LUNG_COMPONENT of
the image each) side by side, or one that has that much lung on each side of the heart (two lungs
joined by a thin bridge, e.g. the trachea: the mask is still right where it matters); lung and heart areas within LUNG_FRACTION / HEART_FRACTION of the
image; the heart inside the thorax (its centroid between the two lungs' centroids horizontally and
within the lungs' vertical extent). Bounds are calibrated so the phantom's and JSRT's ground-truth
masks all pass (tests/test_anatomy_checks.py) with room for paediatric chests.

Fallback rule: an implausible film's mask is never used as if it were right. The anatomy scores
(`cam_in_anatomy`) leave the film out (and count it); the enhancement uses the population prior in
its place: per structure, the pixels that at least PRIOR_SHARE of the plausible films' masks cover.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.data.record import HEART_BIT, LUNGS_BIT
from pipeline.data.store import ArrayStore
from pipeline.io import atomic_path, write_parquet

log = logging.getLogger(__name__)

MIN_LUNG_COMPONENT = 0.02     # share of the image a lung must cover to count as one
LUNG_FRACTION = (0.10, 0.60)  # lungs' share of the image (JSRT GT 0.18-0.46, phantom 0.23-0.36)
HEART_FRACTION = (0.02, 0.25)  # heart's share (JSRT GT 0.06-0.14, phantom 0.04-0.15)
MIN_LUNG_SEPARATION = 0.15    # horizontal distance between the two lungs' centroids, share of the side
PRIOR_SHARE = 0.5             # the prior has a structure where this share of plausible films do

CHECKS_FILE = "plausibility.parquet"
PRIOR_FILE = "prior.npy"


@dataclass
class Check:
    plausible: bool
    reason: str               # "" when plausible; else "; "-joined reasons, each starting with a fixed phrase
    lung_fraction: float
    heart_fraction: float
    n_lung_components: int    # lung components of meaningful size, after post-processing
    blobs_removed: bool       # post-processing dropped something


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, areas, centroids (x, y)) of the 8-connected components; background excluded."""
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return labels, stats[1:, cv2.CC_STAT_AREA], centroids[1:]


def _keep_largest(binary: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
    labels, areas, _ = _components(binary)
    if len(areas) <= k:
        return binary, False
    keep = 1 + np.argsort(-areas, kind="stable")[:k]
    return np.isin(labels, keep), True


def postprocess(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """A bit mask with only the two largest lung components and the largest heart component; and
    whether anything was dropped."""
    lungs, cut_l = _keep_largest((mask & LUNGS_BIT) > 0, 2)
    heart, cut_h = _keep_largest((mask & HEART_BIT) > 0, 1)
    return (lungs * LUNGS_BIT | heart * HEART_BIT).astype(np.uint8), cut_l or cut_h


def _halves(component: np.ndarray, heart: np.ndarray) -> np.ndarray | None:
    """The x centroids of a lung component's parts left and right of the heart's centroid (the
    image's centre without a heart), when both are lung-sized; else None (it is one lung)."""
    xs = np.nonzero(component)[1]
    split = np.nonzero(heart)[1].mean() if heart.any() else component.shape[1] / 2
    left, right = xs[xs < split], xs[xs >= split]
    if min(len(left), len(right)) < MIN_LUNG_COMPONENT * component.size:
        return None
    return np.array([left.mean(), right.mean()])


def check(mask: np.ndarray, blobs_removed: bool = False) -> Check:
    """The checks of the module docstring on one (post-processed) bit mask."""
    side_y, side_x = mask.shape
    area = float(side_y * side_x)
    lungs, heart = (mask & LUNGS_BIT) > 0, (mask & HEART_BIT) > 0
    lung_fraction, heart_fraction = lungs.sum() / area, heart.sum() / area
    labels, areas, cents = _components(lungs)
    big = areas >= MIN_LUNG_COMPONENT * area
    n_lungs = int(big.sum())
    lung_x = cents[big][:, 0]
    if n_lungs == 1:  # two lungs joined by a bridge (the trachea above the heart) still count as two
        halves = _halves(labels == 1 + np.flatnonzero(big)[0], heart)
        if halves is not None:
            lung_x = halves
    reasons = []
    if len(lung_x) != 2:
        reasons.append({0: "no lungs", 1: "one lung"}.get(n_lungs, f"{n_lungs} lung components"))
    elif abs(lung_x[0] - lung_x[1]) < MIN_LUNG_SEPARATION * side_x:
        reasons.append("lungs not side by side")
    lo, hi = LUNG_FRACTION
    if not lo <= lung_fraction <= hi:
        reasons.append(f"lung area {lung_fraction:.3f} outside [{lo}, {hi}]")
    lo, hi = HEART_FRACTION
    if not heart.any():
        reasons.append("no heart")
    elif not lo <= heart_fraction <= hi:
        reasons.append(f"heart area {heart_fraction:.3f} outside [{lo}, {hi}]")
    if heart.any() and len(lung_x) == 2:
        hy, hx = np.argwhere(heart).mean(axis=0)
        ys = np.flatnonzero(lungs.any(axis=1))
        left, right = sorted(lung_x)
        if not (left < hx < right and ys[0] <= hy <= ys[-1]):
            reasons.append("heart outside thorax")
    return Check(not reasons, "; ".join(reasons), round(float(lung_fraction), 4), round(float(heart_fraction), 4),
                 n_lungs, bool(blobs_removed))


def clean_and_check(masks: np.ndarray) -> tuple[np.ndarray, list[Check]]:
    """Post-process and check a batch of bit masks (N, S, S)."""
    out, checks = np.empty_like(masks), []
    for i, m in enumerate(masks):
        out[i], removed = postprocess(m)
        checks.append(check(out[i], removed))
    return out, checks


def checks_frame(image_ids, checks: list[Check]) -> pd.DataFrame:
    return pd.DataFrame([{"image_id": str(i), **asdict(c)} for i, c in zip(image_ids, checks)])


def population_prior(masks: ArrayStore, plausible: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Bit mask (S, S): per structure, pixels at least PRIOR_SHARE of the plausible films cover (all
    films when none is plausible, with a warning: a prior from broken masks is still better than none)."""
    rows = np.flatnonzero(plausible)
    if not len(rows):
        log.warning("no plausible anatomy mask: the prior is drawn from all %d films", len(masks))
        rows = np.arange(len(masks))
    counts = np.zeros((2, *masks.item_shape), np.int64)
    for _, batch in masks.iter_batches(batch_size, rows):
        counts[0] += ((batch & LUNGS_BIT) > 0).sum(axis=0)
        counts[1] += ((batch & HEART_BIT) > 0).sum(axis=0)
    share = counts / max(len(rows), 1)
    return ((share[0] >= PRIOR_SHARE) * LUNGS_BIT | (share[1] >= PRIOR_SHARE) * HEART_BIT).astype(np.uint8)


def write_checks(masks_root: str | os.PathLike, frame: pd.DataFrame) -> np.ndarray:
    """Save the table and the prior beside the store's shards (so the store's DVC output carries them);
    returns the prior."""
    root = Path(masks_root)
    store = ArrayStore(root)
    if len(frame) != len(store):
        raise ValueError(f"{len(frame)} plausibility rows for a mask store of {len(store)}")
    write_parquet(root / CHECKS_FILE, frame)
    prior = population_prior(store, frame["plausible"].to_numpy(bool))
    with atomic_path(root / PRIOR_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, prior)
    return prior


def carry_checks(src_root: str | os.PathLike, dst_root: str | os.PathLike, rows: np.ndarray) -> None:
    """Give a store built from rows `rows` of `src_root` (in that order; e.g. the audit's copy) the
    source's checks and prior, so the fallback rule follows the films. Nothing when the source has none."""
    frame = load_checks(src_root)
    if frame is None:
        return
    write_parquet(Path(dst_root) / CHECKS_FILE, frame.iloc[np.asarray(rows, dtype=np.int64)].reset_index(drop=True))
    with atomic_path(Path(dst_root) / PRIOR_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.load(Path(src_root) / PRIOR_FILE, allow_pickle=False))


def load_checks(masks_root: str | os.PathLike) -> pd.DataFrame | None:
    path = Path(masks_root) / CHECKS_FILE
    return pd.read_parquet(path) if path.is_file() else None


def load_plausibility(masks_root: str | os.PathLike) -> np.ndarray:
    """bool per store row; all True for a store written before the checks existed."""
    frame = load_checks(masks_root)
    if frame is None:
        return np.ones(len(ArrayStore(masks_root)), bool)
    return frame["plausible"].to_numpy(bool)


class SafeMasks:
    """A mask store read with the fallback rule: an implausible row reads as the population prior.
    Quacks like ArrayStore (root, item_shape, len, read, iter_batches), so enhancement code is unchanged."""

    def __init__(self, root: str | os.PathLike):
        self.store = ArrayStore(root)
        self.root, self.item_shape, self.attrs = self.store.root, self.store.item_shape, self.store.attrs
        self.count, self.dtype = self.store.count, self.store.dtype
        self.plausible = load_plausibility(root)
        if len(self.plausible) != len(self.store):
            raise ValueError(f"{root}: {len(self.plausible)} plausibility rows for {len(self.store)} masks")
        prior = Path(root) / PRIOR_FILE
        self.prior = np.load(prior, allow_pickle=False) if prior.is_file() else None
        if self.prior is None and not self.plausible.all():
            raise ValueError(f"{root}: implausible masks but no {PRIOR_FILE} to stand in for them")

    def __len__(self) -> int:
        return self.count

    def read(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = self.store.read(indices)
        bad = ~self.plausible[indices]
        if bad.any():
            out[bad] = self.prior
        return out

    def iter_batches(self, batch_size: int, indices=None):
        idx = np.arange(self.count) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            yield chunk, self.read(chunk)


def open_masks(masks_root: str | os.PathLike) -> SafeMasks:
    """The one way stages read anatomy masks for use: implausible rows replaced by the prior."""
    return SafeMasks(masks_root)
