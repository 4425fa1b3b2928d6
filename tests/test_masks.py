"""Mask datasets in their real layouts feed the U-Net; partial labels stay partial."""
import cv2
import numpy as np
import pytest

from pipeline.config import DataParams, Params, SegmentParams
from pipeline.data.masks import jsrt, montgomery, shenzhen
from pipeline.data.record import HEART_BIT, LUNGS_BIT, Quarantined
from pipeline.data.store import ArrayStoreWriter
from pipeline.segmentation import evaluate_masks, evaluate_stores, mask_sets, partial_targets, UNKNOWN
from tests.fixtures.masks import build_jsrt, build_montgomery, build_shenzhen

P = DataParams(image_size=64)


def _split(items):
    items = list(items)
    recs = [r for r in items if not isinstance(r, Quarantined)]
    return recs, [r for r in items if isinstance(r, Quarantined)]


def _iou_with(rec, truth: np.ndarray, bit: int) -> float:
    ref = cv2.resize(truth.astype(np.float32), rec.image.shape[::-1], interpolation=cv2.INTER_AREA) > 0.5
    got = (rec.anatomy & bit) > 0
    return (got & ref).sum() / (got | ref).sum()


def test_montgomery(tmp_path):
    info = build_montgomery(tmp_path, n=5)
    recs, bad = _split(montgomery.mask_records(tmp_path, P))
    assert len(recs) == 5 and [q.source_path for q in bad] == ["CXR_png/MCUCXR_9998_1.png"]
    assert all(r.known == ("lungs",) and r.image.shape == (64, 64) and not (r.anatomy & HEART_BIT).any() for r in recs)
    assert all(_iou_with(r, info["truth"][r.source_path.split("/")[-1]], LUNGS_BIT) > 0.9 for r in recs)


def test_shenzhen_skips_images_without_masks(tmp_path):
    build_shenzhen(tmp_path, n=4)
    recs, bad = _split(shenzhen.mask_records(tmp_path, P))
    assert len(recs) == 4 and not bad and all(r.known == ("lungs",) for r in recs)


def test_jsrt_raw_and_png_with_heart(tmp_path):
    info = build_jsrt(tmp_path, n=4, raw=2)
    recs, bad = _split(jsrt.mask_records(tmp_path, P))
    assert len(recs) == 4 and not bad
    assert {r.source_path.split("/")[0] for r in recs} == {"All247images", "png"}
    for r in recs:
        assert r.known == ("lungs", "heart") and (r.anatomy & HEART_BIT).any()
        truth = info["truth"][r.source_path.split("/")[-1].split(".")[0]]
        # the raw file decodes to the phantom it came from (12-bit, inverted, resized twice)
        ref = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(truth.image).resize((64, 64)))
        assert np.abs(r.image.astype(int) - ref.astype(int)).mean() < 6
        assert _iou_with(r, truth.heart, HEART_BIT) > 0.9 and _iou_with(r, truth.lungs, LUNGS_BIT) > 0.9


def test_unknown_structures_are_ignored_not_absent(tmp_path):
    masks = np.zeros((2, 8, 8), np.uint8)
    t = partial_targets(masks, np.array([[True, False], [True, True]]), 8)
    assert (t[0, 1] == UNKNOWN).all() and (t[1, 1] == 0).all() and (t[0, 0] == 0).all()
    ev = evaluate_masks(masks, masks, np.array([[True, False], [True, False]]))
    assert ev["heart"]["dice"] is None and ev["lungs"]["n_images"] == 2


def test_mask_sets_fill_the_missing_heart_with_phantom_masks(tmp_path):
    build_montgomery(tmp_path / "m", n=8)
    params = Params(data=P, segment=SegmentParams(mask_sources={"montgomery": str(tmp_path / "m")}, n_train=50))
    train, held, quarantined = mask_sets(params)
    allset = np.concatenate([train.known, held.known])
    assert len(quarantined) == 1
    assert {"montgomery", "phantom"} == set(train.sources + held.sources)
    # real images teach the lungs, phantom ones only the heart
    real = np.array([s == "montgomery" for s in train.sources + held.sources])
    assert allset[real].tolist() == [[True, False]] * real.sum()
    assert allset[~real].tolist() == [[False, True]] * (~real).sum()


@pytest.mark.parametrize("sources", [{}, None])
def test_mask_sets_default_to_phantom(sources):
    params = Params(data=P, segment=SegmentParams(n_train=20))
    train, held, _ = mask_sets(params)
    assert len(train.images) == 20 and set(train.sources) == {"phantom"} and train.known.all() and len(held.images) > 0


def test_scoring_a_mask_store_batch_by_batch_equals_scoring_it_at_once(tmp_path):
    rng = np.random.default_rng(0)
    pred, truth = (rng.integers(0, 4, size=(50, 16, 16)).astype(np.uint8) for _ in range(2))
    stores = []
    for name, arr in (("pred", pred), ("truth", truth)):
        w = ArrayStoreWriter(tmp_path / name, (16, 16), np.uint8, shard_size=8)
        w.append(arr)
        stores.append(w.close())
    rows = np.array([3, 17, 4, 40, 41, 9, 33])
    whole = evaluate_masks(pred[rows], truth[rows], np.ones((len(rows), 2), bool))
    assert evaluate_stores(*stores, rows, batch_size=3) == whole
    assert 0 < whole["lungs"]["dice"] < 1 and whole["n_images"] == 7
