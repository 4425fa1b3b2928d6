"""The shortcut audit: a controlled marker planted outside the predicted anatomy, agreeing with a label
with probability p in train/val/test and 1 - p in a test_shifted copy of test."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.audit import (SHIFTED_SUFFIX, audited_manifest, glyph, marker_boxes, marker_scores, place,
                            write_audit)
from pipeline.config import AuditParams, Paths
from pipeline.data.record import HEART_BIT, LUNGS_BIT
from pipeline.data.store import ArrayStore, write_store

SIDE = 64


def _dataset(tmp_path, n=400, seed=0):
    rng = np.random.default_rng(seed)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.15, 0.25])
    manifest = pd.DataFrame({"image_id": [f"f{i:04d}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                             "split": split, "Pneumonia": rng.integers(0, 2, n).astype(float)})
    images = rng.integers(40, 200, (n, SIDE, SIDE)).astype(np.uint8)
    masks = np.zeros((n, SIDE, SIDE), np.uint8)
    masks[:, 12:52, 10:28] = LUNGS_BIT      # a chest in the middle; the corners stay free
    masks[:, 12:52, 36:54] = LUNGS_BIT
    masks[:, 30:50, 26:40] |= HEART_BIT
    img = write_store(tmp_path / "images", [images], np.uint8, 128)
    msk = write_store(tmp_path / "masks", [masks], np.uint8, 128)
    return manifest, img, msk, images, masks


def test_place_clears_the_anatomy_and_falls_back_to_the_next_corner():
    g = glyph(SIDE, AuditParams())
    anatomy = np.zeros((SIDE, SIDE), np.uint8)
    y, x, clear = place(g.shape, anatomy, margin=1)
    assert clear and y <= 2 and x <= 2                              # top-left, near the corner
    anatomy[: SIDE // 2, : SIDE // 2] = LUNGS_BIT                    # top-left quadrant taken
    y, x, clear = place(g.shape, anatomy, margin=1)
    assert clear and y <= 2 and x >= SIDE - g.shape[1] - 2            # top-right instead
    assert not (anatomy[y:y + g.shape[0], x:x + g.shape[1]]).any()
    y, x, clear = place(g.shape, np.full((SIDE, SIDE), LUNGS_BIT, np.uint8), margin=1)
    assert (y, x, clear) == (0, 0, False)                             # nowhere clear: counted, drawn top-left


def test_audit_plants_the_same_glyph_outside_the_anatomy_with_the_chosen_agreement(tmp_path):
    manifest, img, msk, images, masks = _dataset(tmp_path)
    p = AuditParams(enabled=True, label="Pneumonia", p=0.9, seed=3)
    summary = write_audit(p, manifest, img, msk, Paths(tmp_path), 128)
    dest = Paths(tmp_path, audit=True)
    out = pd.read_parquet(dest.manifest)
    markers = pd.read_parquet(dest.audit_markers)
    n_test = int((manifest["split"] == "test").sum())
    assert len(out) == len(manifest) + n_test and (out["split"] == "test_shifted").sum() == n_test
    shifted = out[out["split"] == "test_shifted"]
    assert shifted["image_id"].str.endswith(SHIFTED_SUFFIX).all() and out["image_id"].is_unique
    assert (shifted["patient_id"].to_numpy() == manifest.loc[manifest["split"] == "test", "patient_id"].to_numpy()).all()

    audited, amasks = ArrayStore(dest.images), ArrayStore(dest.masks)
    source = np.concatenate([np.arange(len(manifest)), np.flatnonzero(manifest["split"] == "test")])
    assert (amasks.read(np.arange(len(out))) == masks[source]).all()     # masks unchanged, copied for the copies
    g = glyph(SIDE, p)
    y_lab = out["Pneumonia"].to_numpy()
    for i in range(len(out)):
        m = markers.iloc[i]
        a, before = audited[i], images[source[i]]
        changed = a != before
        if m["drawn"]:
            box = (slice(m["y"], m["y"] + m["h"]), slice(m["x"], m["x"] + m["w"]))
            assert (a[box][g] == 255).all()                              # the same glyph, the same value
            assert not changed[~np.pad(np.ones(g.shape, bool), ((m["y"], SIDE - m["y"] - m["h"]),
                                                                 (m["x"], SIDE - m["x"] - m["w"])))].any()
            assert not (masks[source[i]][box] > 0).any()                 # outside the predicted anatomy
        else:
            assert not changed.any()
    agree = markers["drawn"].to_numpy() == (y_lab == 1)
    for split, want in (("train", 0.9), ("test", 0.9), ("test_shifted", 0.1)):
        sel = out["split"].to_numpy() == split
        assert abs(agree[sel].mean() - want) < 0.08, (split, agree[sel].mean())
        assert summary["splits"][split]["agreement"] == pytest.approx(agree[sel].mean(), abs=1e-4)
    assert summary["not_clear"] == 0


def test_a_films_draw_depends_only_on_its_id(tmp_path):
    manifest, img, msk, *_ = _dataset(tmp_path)
    p = AuditParams(enabled=True, p=0.8)
    a, b = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    write_audit(p, manifest, img, msk, a, 128)
    write_audit(p, manifest.iloc[::-1].reset_index(drop=True), img, msk, b, 128)
    a = pd.read_parquet(a.audit_markers).set_index("image_id")["drawn"]
    b = pd.read_parquet(b.audit_markers).set_index("image_id")["drawn"]
    assert a.sort_index().equals(b.sort_index())


def test_audit_refuses_what_it_cannot_do(tmp_path):
    manifest, *_ = _dataset(tmp_path, n=20)
    with pytest.raises(ValueError, match="not a label"):
        audited_manifest(manifest, AuditParams(label="Cardiomegaly"))
    phantom_like = manifest.assign(split=["test_shifted"] + manifest["split"].tolist()[1:])
    with pytest.raises(ValueError, match="already has a test_shifted"):
        audited_manifest(phantom_like, AuditParams())


def test_marker_scores_count_peaks_and_energy_on_the_marker():
    cams = np.zeros((3, 16, 16), np.float32)
    cams[0, 1, 1] = 1.0                    # peak on the marker
    cams[1, 10, 10] = 1.0                  # peak elsewhere
    cams[2, 1, 1] = 1.0                    # no marker drawn on this film: not counted
    s = marker_scores(cams, [(0, 0, 4, 4), (0, 0, 4, 4), None], tolerance_px=0)
    assert s == {"marker_pointing": 0.5, "cam_on_marker": 0.5, "n_marked": 2}
    markers = pd.DataFrame({"image_id": ["a", "b"], "drawn": [True, False], "x": [1, 2], "y": [3, 4],
                            "w": [5, 5], "h": [6, 6]})
    assert marker_boxes(markers, ["b", "a", "zz"]) == [None, (1, 3, 5, 6), None]
