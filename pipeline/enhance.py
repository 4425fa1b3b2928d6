"""Enhancement policies: build the next cycle's training images from the raw ones.

`counterfactual` (default) follows the rules of docs/enhancement.md:
  1. the same transform for every image, whatever its label;
  2. shortcut content is decorrelated, not hidden: each image keeps its own anatomy (lungs ∪ heart,
     dilated by a margin) and the rest is replaced by the same region of a random other training
     image (any label), so a marker stays present in both classes and carries no information;
  3. Grad-CAM guides where: the previous model's attention *outside each label's anatomy*, pooled
     over all training images (positives and negatives alike), forms two atlases. Inaccurate CAMs
     (share inside the anatomy < `keep_share`) vote for the *hot* atlas: those regions are swapped
     even inside the anatomy margin (`region: outside`), or are the only regions swapped
     (`region: cam`). Accurate CAMs vote for the *keep* atlas: where a model that already looks at
     the anatomy finds evidence just beyond the predicted mask (a U-Net that clips a costophrenic
     angle), that region is kept — but only within `keep_band` px of each image's anatomy, and only
     when at least KEEP_MIN_SUPPORT of the CAMs are accurate: anything kept further out could be a
     marker, and a shortcut that is kept is relearnt (measured: a keep region fed by 10 of 5,900 CAMs
     caught the corner of the "R" marker and cycle 2's shifted accuracy fell from 0.85 to 0.64).
     Both atlases are pooled, so every image gets the same regions.
Masks are read through anatomy_checks.open_masks: a film whose predicted mask failed the plausibility
checks is enhanced with the population prior anatomy in its place (same rule for every film).
`overlay` is the literal published recipe (positives × CAM×anatomy, negatives × anatomy, rest dimmed)
and `suppress` zeroes everything outside the anatomy; both are kept for comparison only: they
transform the classes differently or hide the shortcut, which the trial in docs/enhancement.md measured
to make things worse.

`compute` (device, precision) does not apply here, deliberately: the only torch is the bilinear
upsampling of stored float16 CAMs (`maps.upsample`), in fp32 on the CPU, between numpy steps. On a
GPU each batch would cross the bus twice for one cheap op, and the atlas thresholds would then
depend on the device's rounding; on the CPU the enhanced images are the same bytes everywhere.
"""
from __future__ import annotations

import logging
import typing
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.anatomy_checks import open_masks
from pipeline.cam.maps import upsample
from pipeline.config import EnhanceParams
from pipeline.data.labels import anatomy_of
from pipeline.data.record import decode_anatomy
from pipeline.data.store import ArrayStore, write_store
from pipeline.engine import Engine, in_process, shard_slices

log = logging.getLogger(__name__)

# policies whose transform needs neither labels nor per-image CAMs (so it also applies to val images)
LABEL_BLIND = ("counterfactual", "suppress")
KEEP_MIN_SUPPORT = 0.01  # share of all CAMs that must be accurate before their atlas is trusted

POLICIES: tuple[str, ...] = typing.get_args(EnhanceParams.model_fields["policy"].annotation)


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def _feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    w = mask.astype(np.float32)
    return cv2.GaussianBlur(w, (0, 0), sigma) if sigma > 0 else w


def off_anatomy_atlas(cams: ArrayStore, masks: ArrayStore, labels: list[str], keep_share: float,
                      batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, dict]:
    """CAM energy outside each label's anatomy, summed over all training images, in image pixels.

    Returns (hot atlas from inaccurate CAMs, keep atlas from accurate ones — each normalised to max 1 —
    and stats). A CAM is accurate when its share inside its label's anatomy is >= keep_share.
    """
    size = masks.item_shape[-1]
    atlas = np.zeros((size, size), dtype=np.float64)
    keep = np.zeros((size, size), dtype=np.float64)
    n_votes, n_accurate, shares = 0, 0, []
    structures = [anatomy_of(label) for label in labels]
    for idx, cam_batch in cams.iter_batches(batch_size):
        up = upsample(cam_batch, size)                   # (n, L, S, S)
        m = masks.read(idx)
        for k, structure in enumerate(structures):
            region = decode_anatomy(m, structure)         # (n, S, S)
            energy = up[:, k].sum(axis=(1, 2)) + 1e-8
            share = (up[:, k] * region).sum(axis=(1, 2)) / energy
            shares += share.tolist()
            vote = share < keep_share
            n_accurate += int((~vote).sum())
            n_votes += int(vote.sum())
            off = up[:, k] * ~region / energy[:, None, None]
            atlas += off[vote].sum(axis=0)
            keep += off[~vote].sum(axis=0)
    for a in (atlas, keep):
        if a.max() > 0:
            a /= a.max()
    stats = {"mean_cam_in_anatomy": float(np.mean(shares)) if shares else None,
             "accurate_cams": n_accurate, "voting_cams": n_votes}
    return atlas.astype(np.float32), keep.astype(np.float32), stats


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point: nobody is their own donor."""
    if n < 2:
        return np.arange(n)
    perm = rng.permutation(n)
    for i in np.flatnonzero(perm == np.arange(n)):
        if perm[i] == i:  # swapping with any j != i fixes i and cannot create a new fixed point
            j = (i + 1) % n
            perm[i], perm[j] = perm[j], perm[i]
    return perm


def counterfactual(images: np.ndarray, donors: np.ndarray, anatomy: np.ndarray, hot: np.ndarray | None,
                   p: EnhanceParams, keep: np.ndarray | None = None) -> np.ndarray:
    """Keep each image's anatomy (and the `keep` regions near it); take the rest from its donor.

    Label-blind: `hot` and `keep` are the same for every image.
    """
    out = np.empty_like(images)
    for i in range(len(images)):
        inside = anatomy[i] > 0
        kept = _dilate(inside, p.anatomy_margin)
        if keep is not None:
            kept |= keep & _dilate(inside, p.anatomy_margin + p.keep_band)
        if p.region == "outside":
            swap = ~kept if hot is None else (~kept | (hot & ~inside))
        else:  # "cam": only the attended off-anatomy regions
            swap = np.zeros_like(kept) if hot is None else (hot & ~inside)
        w = _feather(swap, p.feather)
        out[i] = np.clip(w * donors[i] + (1 - w) * images[i], 0, 255).round().astype(np.uint8)
    return out


def overlay(images: np.ndarray, anatomy: np.ndarray, cams_up: np.ndarray, targets: np.ndarray,
            p: EnhanceParams) -> np.ndarray:
    """The literal published recipe (label-dependent): kept for comparison, not as a default."""
    out = np.empty_like(images)
    for i in range(len(images)):
        region = (anatomy[i] > 0).astype(np.float32)
        positive = np.nan_to_num(targets[i]) > 0
        weight = region * cams_up[i][positive].max(axis=0) if positive.any() else region
        factor = p.overlay_floor + (1 - p.overlay_floor) * weight
        out[i] = np.clip(images[i] * factor, 0, 255).round().astype(np.uint8)
    return out


def suppress(images: np.ndarray, anatomy: np.ndarray, p: EnhanceParams) -> np.ndarray:
    """Zero everything outside the (dilated) anatomy, the same for every image: hides, not decorrelates."""
    keep = np.stack([_dilate(a > 0, p.anatomy_margin) for a in anatomy])
    return np.where(keep, images, 0).astype(np.uint8)


@dataclass
class Plan:
    """Where to decorrelate (`hot`) and what to keep, from the previous model's training-set CAMs;
    the same for every image it is applied to."""
    hot: np.ndarray | None
    keep: np.ndarray | None
    atlas: np.ndarray
    keep_atlas: np.ndarray
    stats: dict


def make_plan(p: EnhanceParams, cams: ArrayStore, masks: ArrayStore, train_idx: np.ndarray,
              labels: list[str], reviewed: np.ndarray | None = None) -> Plan:
    """Pool the training set's CAMs (aligned with `train_idx`) into the hot and keep regions.

    `reviewed`: the region clinicians marked as shortcuts (pipeline.feedback.shortcut_region), hot
    whatever the CAMs say: decorrelated even inside the anatomy margin, never kept."""
    if len(cams) != len(train_idx):
        raise ValueError(f"CAM store has {len(cams)} items for {len(train_idx)} training images")
    atlas, keep_atlas, stats = off_anatomy_atlas(cams, _Subset(masks, train_idx), labels, p.keep_share)
    hot = atlas >= p.cam_threshold if atlas.max() > 0 else None
    if reviewed is not None:
        hot = reviewed.copy() if hot is None else hot | reviewed
    stats["reviewed_fraction"] = float(reviewed.mean()) if reviewed is not None else 0.0
    trusted = stats["accurate_cams"] >= KEEP_MIN_SUPPORT * (stats["accurate_cams"] + stats["voting_cams"])
    keep = keep_atlas >= p.cam_threshold if trusted and keep_atlas.max() > 0 else None
    if keep is not None and hot is not None:
        keep &= ~hot  # where shortcut-reading CAMs look, decorrelation wins
    stats["hot_fraction"] = float(hot.mean()) if hot is not None else 0.0
    stats["keep_fraction"] = float(keep.mean()) if keep is not None else 0.0
    stats["policy"] = p.policy
    return Plan(hot, keep, atlas, keep_atlas, stats)


def enhance_shard(p: EnhanceParams, hot: np.ndarray | None, keep: np.ndarray | None, images_root: str,
                  masks_root: str, rows: np.ndarray, donor_rows: np.ndarray, cams_root: str | None,
                  cam_rows: np.ndarray, targets: np.ndarray | None, batch_size: int = 256) -> np.ndarray:
    """The enhanced images of `rows` (one task); `donor_rows` are their donors, `cam_rows` their
    positions in the CAM store (overlay only)."""
    images, masks = ArrayStore(images_root), open_masks(masks_root)  # the prior stands in for implausible masks
    cams = ArrayStore(cams_root) if cams_root else None
    size = images.item_shape[-1]
    out = []
    for s in shard_slices(len(rows), batch_size):
        imgs, anat = images.read(rows[s]), masks.read(rows[s])
        if p.policy == "counterfactual":
            out.append(counterfactual(imgs, images.read(donor_rows[s]), anat, hot, p, keep))
        elif p.policy == "overlay":
            out.append(overlay(imgs, anat, upsample(cams.read(cam_rows[s]), size), targets[s], p))
        else:
            out.append(suppress(imgs, anat, p))
    return np.concatenate(out)


def apply_plan(p: EnhanceParams, plan: Plan, images: ArrayStore, masks: ArrayStore, rows: np.ndarray, out_dir,
               shard_size: int, seed: list[int], cams: ArrayStore | None = None, targets: np.ndarray | None = None,
               engine: Engine | None = None) -> ArrayStore:
    """Write the enhanced images of `rows` (a store aligned with `rows`), one task per output shard;
    donors are other images of the same rows. `overlay` also needs these rows' CAMs and labels (it is
    label-dependent)."""
    if p.policy == "overlay" and (cams is None or targets is None):
        raise ValueError("the overlay policy needs each image's CAMs and labels")
    engine = engine or in_process()
    donor_of = derangement(len(rows), np.random.default_rng(seed))  # drawn once, whole-dataset, here
    local = np.arange(len(rows))
    cams_root = str(cams.root.resolve()) if p.policy == "overlay" else None
    tasks = ((p, plan.hot, plan.keep, str(images.root.resolve()), str(masks.root.resolve()), rows[s],
              rows[donor_of[s]], cams_root, local[s], None if targets is None else targets[s])
             for s in shard_slices(len(rows), shard_size))
    return write_store(out_dir, engine.map(enhance_shard, tasks), np.uint8, shard_size, attrs={"policy": p.policy},
                       progress="enhance", total=len(rows))


def enhance(p: EnhanceParams, images: ArrayStore, masks: ArrayStore, cams: ArrayStore,
            train_idx: np.ndarray, targets: np.ndarray, labels: list[str], out_dir, shard_size: int,
            cycle: int, engine: Engine | None = None, reviewed: np.ndarray | None = None) -> tuple[ArrayStore, Plan]:
    """Plan from the training CAMs (and the reviewers' shortcut region) and write the enhanced training
    images (aligned with `train_idx`)."""
    plan = make_plan(p, cams, masks, train_idx, labels, reviewed)
    store = apply_plan(p, plan, images, masks, train_idx, out_dir, shard_size, [p.seed, cycle], cams, targets,
                       engine)
    plan.stats["n_images"] = int(len(train_idx))
    return store, plan


class _Subset:
    """A store view restricted to some rows (so the atlas reads masks of training images only)."""

    def __init__(self, store: ArrayStore, idx: np.ndarray):
        self.store, self.idx, self.item_shape = store, idx, store.item_shape

    def read(self, local: np.ndarray) -> np.ndarray:
        return self.store.read(self.idx[local])


def class_separability(images: np.ndarray, region: np.ndarray, y: np.ndarray) -> dict:
    """How well simple statistics alone separate the classes: AUROC (folded to >= 0.5) per statistic.

    Rule 1 of docs/enhancement.md: enhancement must not make any of these better than on the raw images.
    """
    from sklearn.metrics import roc_auc_score

    known = ~np.isnan(y)
    y, images, region = y[known], images[known].astype(np.float32), region[known]
    stats = {
        "mean_intensity": images.mean(axis=(1, 2)),
        "mean_in_anatomy": (images * region).sum(axis=(1, 2)) / np.maximum(region.sum(axis=(1, 2)), 1),
        "mean_outside_anatomy": (images * ~region).sum(axis=(1, 2)) / np.maximum((~region).sum(axis=(1, 2)), 1),
        "std_intensity": images.std(axis=(1, 2)),
    }
    if len(np.unique(y)) < 2:
        return {k: None for k in stats}
    out = {}
    for name, values in stats.items():
        auc = roc_auc_score(y, values)
        out[name] = float(max(auc, 1 - auc))
    return out
