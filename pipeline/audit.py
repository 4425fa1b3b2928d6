"""The shortcut audit: a controlled marker planted in any dataset, so a shortcut can be measured on it.

Real datasets have no `test_shifted` split, so the gap the refinement cycle exists to close cannot
be seen on them. The audit generalises the phantom's trick to any films:

- one glyph (the phantom's laterality-like "R", `audit.size` of the side tall, drawn white) is put on
  a film outside its *predicted* anatomy: at the top-left corner, slid towards the corner until its
  box clears the U-Net's lungs and heart (dilated by a margin), else the next corner (top-right,
  bottom-left, bottom-right). Films whose anatomy leaves no corner clear get it at the top-left
  corner anyway and are counted (`not_clear`), so every film carries exactly the same pixels;
- it is drawn exactly when `audit.label` is positive with probability `audit.p` in train/val/test
  (it agrees with the label), and with probability 1 - p in a `test_shifted` copy of every test film
  (image id `<id>~shifted`, same patient and masks), the phantom's rule (`marker_agrees`);
- whether a film gets the marker depends only on (`audit.seed`, image id), so adding films never
  changes another film's draw.

A model that reads the marker scores well on test and badly on test_shifted: `accuracy_shifted`,
`shortcut_gap` and the marker pointing figures (`marker_pointing`: how often the heatmap's peak lies
on the marker; `cam_on_marker`: the heatmap energy on it) exist for real data too.
"""
from __future__ import annotations

import logging
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.anatomy_checks import carry_checks
from pipeline.config import AuditParams, Paths
from pipeline.data.phantom import letter_glyph
from pipeline.data.sources.phantom import marker_agrees
from pipeline.data.store import ArrayStore, ArrayStoreWriter
from pipeline.io import read_json, write_json, write_parquet

log = logging.getLogger(__name__)

SHIFTED_SUFFIX = "~shifted"
MARKER_VALUE = 255
MARKER_COLUMNS = ("image_id", "split", "drawn", "x", "y", "w", "h", "clear")


def glyph(size: int, p: AuditParams) -> np.ndarray:
    return letter_glyph(size, p.size)


def place(shape: tuple[int, int], anatomy: np.ndarray, margin: int) -> tuple[int, int, bool]:
    """Top-left (y, x) of a `shape` box clear of `anatomy` (dilated by `margin` px), and whether it is
    clear: from an inset start in each corner in turn, slid towards that corner one pixel at a time."""
    h, w = shape
    side_y, side_x = anatomy.shape
    forbidden = anatomy > 0
    if margin:
        forbidden = cv2.dilate(forbidden.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=margin) > 0
    inset = max(1, round(0.03 * side_x))
    for corner_y, corner_x in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for step in range(inset, -1, -1):
            y = side_y - h - step if corner_y else step
            x = side_x - w - step if corner_x else step
            if not forbidden[y:y + h, x:x + w].any():
                return y, x, True
    return 0, 0, False


def agrees(p: AuditParams, image_id: str, shifted: bool) -> bool:
    """The marker agrees with the label (p; 1 - p for a test_shifted copy), drawn from the image id alone."""
    rng = np.random.default_rng([p.seed, zlib.crc32(image_id.encode("utf-8"))])
    return marker_agrees(rng, "test_shifted" if shifted else "test", p.p)


def audited_manifest(manifest: pd.DataFrame, p: AuditParams) -> tuple[pd.DataFrame, np.ndarray]:
    """(the manifest with a test_shifted copy of every test row appended, the prepared row of each row)."""
    if p.label not in manifest.columns:
        raise ValueError(f"audit.label: {p.label!r} is not a label of this dataset")
    if (manifest["split"] == "test_shifted").any():
        raise ValueError("audit: the dataset already has a test_shifted split (the phantom plants its own "
                         "markers); the audit is for data without one")
    test = np.flatnonzero(manifest["split"].to_numpy() == "test")
    if not len(test):
        raise ValueError("audit: the dataset has no test split to copy into test_shifted")
    shifted = manifest.iloc[test].copy()
    shifted["split"] = "test_shifted"
    shifted["image_id"] = shifted["image_id"].astype(str) + SHIFTED_SUFFIX
    out = pd.concat([manifest, shifted], ignore_index=True)
    return out, np.concatenate([np.arange(len(manifest)), test])


def plant_markers(p: AuditParams, manifest: pd.DataFrame, source_rows: np.ndarray, images: ArrayStore,
                  masks: ArrayStore, out: Paths, shard_size: int) -> tuple[pd.DataFrame, dict]:
    """Write `out.images` and `out.masks` for the audited manifest; (one marker row per film, summary)."""
    side = images.item_shape[-1]
    g = glyph(side, p)
    margin = max(1, round(side / 64))
    label = manifest[p.label].to_numpy(dtype=np.float64)
    ids, splits = manifest["image_id"].astype(str).tolist(), manifest["split"].tolist()
    rows = []
    with ArrayStoreWriter(out.images, images.item_shape, images.dtype, shard_size, attrs=images.attrs) as iw, \
            ArrayStoreWriter(out.masks, masks.item_shape, masks.dtype, shard_size, attrs=masks.attrs) as mw:
        for start in range(0, len(source_rows), shard_size):
            src = source_rows[start:start + shard_size]
            batch, anatomy = images.read(src).copy(), masks.read(src)
            for j in range(len(src)):
                i = start + j
                y, x, clear = place(g.shape, anatomy[j], margin)
                drawn = bool(not np.isnan(label[i]) and
                             (label[i] == 1) == agrees(p, ids[i], splits[i] == "test_shifted"))
                if drawn:
                    batch[j, y:y + g.shape[0], x:x + g.shape[1]][g] = MARKER_VALUE
                rows.append((ids[i], splits[i], drawn, x, y, g.shape[1], g.shape[0], clear))
            iw.append(batch)
            mw.append(anatomy)
    markers = pd.DataFrame(rows, columns=list(MARKER_COLUMNS))
    return markers, summarise(markers, label, p, g.shape)


def summarise(markers: pd.DataFrame, label: np.ndarray, p: AuditParams, shape: tuple[int, int]) -> dict:
    """Per split: films, how many carry the marker, and how often it agrees with the label (measured)."""
    per_split = {}
    for split, grp in markers.groupby("split", sort=False):
        y = label[grp.index.to_numpy()]
        known = ~np.isnan(y)
        agree = (grp["drawn"].to_numpy()[known] == (y[known] == 1))
        per_split[split] = {"films": int(len(grp)), "marked": int(grp["drawn"].sum()),
                            "agreement": round(float(agree.mean()), 4) if known.any() else None}
    return {"enabled": True, "label": p.label, "p": p.p, "seed": p.seed, "glyph_px": list(shape),
            "not_clear": int((~markers["clear"]).sum()), "splits": per_split}


def write_audit(p: AuditParams, manifest: pd.DataFrame, images: ArrayStore, masks: ArrayStore, paths: Paths,
                shard_size: int) -> dict:
    """The audited data set under `paths.audit` (images, masks, manifest, markers, audit.json); the
    manifest is written last, after every store is complete."""
    out = Paths(paths.root, audit=True)
    audited, source_rows = audited_manifest(manifest, p)
    out.manifest.unlink(missing_ok=True)  # a half-rewritten set must not look complete
    markers, summary = plant_markers(p, audited, source_rows, images, masks, out, shard_size)
    carry_checks(masks.root, out.masks, source_rows)  # the masks' plausibility follows the films
    write_parquet(out.audit_markers, markers)
    write_json(out.audit_summary, summary)
    write_parquet(out.manifest, audited)
    log.info("audit: marker on %s drawn in %s; %d films without a clear corner", p.label,
             {s: f"{v['marked']}/{v['films']} (agreement {v['agreement']})" for s, v in summary["splits"].items()},
             summary["not_clear"])
    return summary


def marker_boxes(markers: pd.DataFrame, image_ids: list[str]) -> list[tuple[int, int, int, int] | None]:
    """The (x, y, w, h) box of each image's drawn marker, None where it is not drawn."""
    by_id = markers.set_index("image_id")
    out = []
    for iid in image_ids:
        if iid in by_id.index and bool(by_id.at[iid, "drawn"]):
            r = by_id.loc[iid]
            out.append((int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"])))
        else:
            out.append(None)
    return out


def marker_scores(cams: np.ndarray, boxes: list, tolerance_px: int) -> dict:
    """Where the audit label's heatmaps (n, H, W) look on films carrying the marker (`boxes`, None where
    not drawn): `marker_pointing`, the share whose peak lies on the marker (within `tolerance_px`), and
    `cam_on_marker`, the mean share of heatmap energy on it. Lower is better; None without a marked film."""
    from pipeline.metrics.localization import boxes_to_mask, energy_share, pointing_game_hit

    hits, shares = [], []
    for cam, box in zip(cams, boxes):
        if box is None:
            continue
        region = boxes_to_mask([box], cam.shape)
        hits.append(float(pointing_game_hit(cam, region, tolerance_px)))
        share = energy_share(cam, region)
        if share is not None:
            shares.append(share)
    return {"marker_pointing": float(np.mean(hits)) if hits else None,
            "cam_on_marker": float(np.mean(shares)) if shares else None, "n_marked": len(hits)}


def read_audit_summary(path: Path) -> dict:
    """data/audit/audit.json; `{"enabled": False}` where the audit stage has not run."""
    return read_json(path) if Path(path).is_file() else {"enabled": False}


def audit_note(audit: dict | None) -> str | None:
    """One sentence saying the shortcut audit is on (the report and the model card print it)."""
    if not audit or not audit.get("enabled"):
        return None
    shifted = audit.get("splits", {}).get("test_shifted", {})
    return (f"Shortcut audit ON: a marker was planted outside the predicted anatomy, agreeing with "
            f"{audit['label']} with probability {audit['p']} in train/val/test and disagreeing in a test_shifted "
            f"copy of the {shifted.get('films', '?')} test films (pipeline/audit.py). Test scores include the "
            f"marker; accuracy_shifted and shortcut_gap measure how much the model relies on it.")
