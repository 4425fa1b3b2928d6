"""Plausibility of anatomy masks: ground truth passes, broken masks are flagged with their reason,
and an implausible film is left out of cam_in_anatomy and enhanced with the population prior."""
import numpy as np
import pandas as pd
import pytest

from pipeline.anatomy_checks import (PRIOR_FILE, carry_checks, check, checks_frame, clean_and_check, load_plausibility,
                                     open_masks, postprocess, write_checks)
from pipeline.config import DataParams, EnhanceParams
from pipeline.data.masks import phantom as phantom_masks
from pipeline.data.record import LUNGS_BIT
from pipeline.data.store import ArrayStoreWriter
from pipeline.enhance import Plan, apply_plan
from pipeline.evaluation import localisation
from tests.fixtures.anatomy import broken_variants


@pytest.fixture(scope="module")
def phantom_gt():
    return np.stack([r.anatomy for r in phantom_masks.mask_records(120, DataParams(image_size=64), seed=3)])


def _store(path, arr, shard_size=8):
    w = ArrayStoreWriter(path, arr.shape[1:], arr.dtype, shard_size=shard_size)
    w.append(arr)
    return w.close()


def test_phantom_ground_truth_masks_are_plausible(phantom_gt):
    cleaned, checks = clean_and_check(phantom_gt)
    assert all(c.plausible for c in checks), [c.reason for c in checks if not c.plausible]
    assert all(c.n_lung_components == 2 for c in checks) and not any(c.blobs_removed for c in checks)
    np.testing.assert_array_equal(cleaned, phantom_gt)  # nothing to clean on a ground truth


def test_broken_masks_are_flagged_with_their_reason(phantom_gt):
    v = broken_variants(phantom_gt[0])
    c = check(*postprocess(v["one lung"]))
    assert not c.plausible and c.reason.startswith("one lung") and c.n_lung_components == 1
    cleaned, removed = postprocess(v["blob"])
    assert removed and check(cleaned, removed).plausible  # a speck outside the chest is cleaned away
    np.testing.assert_array_equal(cleaned, phantom_gt[0])
    c = check(*postprocess(v["heart outside thorax"]))
    assert not c.plausible and "heart outside thorax" in c.reason
    joined = phantom_gt[0].copy()  # the two lungs bridged above the heart: still two lungs
    ys, xs = np.nonzero(joined & LUNGS_BIT)
    top = ys.min() + 4
    joined[top:top + 2, xs.min():xs.max()] |= LUNGS_BIT
    c = check(joined)
    assert c.plausible and c.n_lung_components == 1, c
    c = check(phantom_gt[0] & np.uint8(LUNGS_BIT))
    assert not c.plausible and c.reason == "no heart"
    c = check(np.zeros_like(phantom_gt[0]))
    assert c.reason.startswith("no lungs") and "lung area 0.000" in c.reason


def test_the_table_the_prior_and_the_fallback_reader(phantom_gt, tmp_path):
    masks = phantom_gt[:20].copy()
    masks[5] = broken_variants(masks[5])["one lung"]
    store = _store(tmp_path / "masks", masks)
    assert load_plausibility(store.root).all() and open_masks(store.root).prior is None  # an old store
    cleaned, checks = clean_and_check(masks)
    frame = checks_frame([f"img{i}" for i in range(20)], checks)
    assert list(frame.columns[:6]) == ["image_id", "plausible", "reason", "lung_fraction", "heart_fraction",
                                       "n_lung_components"]
    prior = write_checks(store.root, frame)
    flags = load_plausibility(store.root)
    assert flags.tolist() == [i != 5 for i in range(20)]
    # the prior: where at least half the plausible films have the structure; plausible itself
    share = ((masks[flags] & LUNGS_BIT) > 0).mean(axis=0)
    np.testing.assert_array_equal((prior & LUNGS_BIT) > 0, share >= 0.5)
    assert check(prior).plausible
    safe = open_masks(store.root)
    got = safe.read(np.array([4, 5, 6]))
    np.testing.assert_array_equal(got[0], masks[4])
    np.testing.assert_array_equal(got[1], prior)
    # carried to a store of other rows (the shortcut audit's copy), the flags follow the films
    carry_checks(store.root, _store(tmp_path / "copy", masks[[5, 1, 5]]).root, np.array([5, 1, 5]))
    assert load_plausibility(tmp_path / "copy").tolist() == [False, True, False]
    assert (tmp_path / "copy" / PRIOR_FILE).is_file()


def test_enhancement_uses_the_prior_for_an_implausible_film(phantom_gt, tmp_path):
    rng = np.random.default_rng(0)
    n = 12
    images = rng.integers(0, 256, size=(n, 64, 64), dtype=np.uint8)
    masks = phantom_gt[:n].copy()
    masks[3] = broken_variants(masks[3])["one lung"]
    img_store, mask_store = _store(tmp_path / "images", images), _store(tmp_path / "masks", masks)
    _, checks = clean_and_check(masks)
    prior = write_checks(mask_store.root, checks_frame(range(n), checks))
    p = EnhanceParams(feather=0.0, anatomy_margin=0)
    plan = Plan(None, None, np.zeros((64, 64), np.float32), np.zeros((64, 64), np.float32), {})
    out = apply_plan(p, plan, img_store, open_masks(mask_store.root), np.arange(n), tmp_path / "out", 8, [0]).read(
        np.arange(n))
    kept = out == images
    assert (kept[3] == (prior > 0)).mean() > 0.99  # the prior's anatomy kept, the film's broken mask ignored
    assert (kept[4] == (masks[4] > 0)).mean() > 0.99  # a plausible film keeps its own


def test_cam_in_anatomy_leaves_implausible_films_out():
    anatomy = np.zeros((3, 8, 8), np.uint8)
    anatomy[:, 2:6, 2:6] = LUNGS_BIT
    cams = np.zeros((3, 1, 8, 8), np.float32)
    cams[0, 0, 3, 3] = 1.0   # inside the lungs
    cams[1, 0, 0, 0] = 1.0   # outside: its mask is implausible, so it must not count
    cams[2, 0, 4, 4] = 1.0
    targets = np.ones((3, 1))
    boxes = pd.DataFrame(columns=["image_id", "label", "x", "y", "w", "h"])
    args = (cams, anatomy, targets, ["a", "b", "c"], boxes, ["Pneumonia"], 0)
    assert localisation(*args)["cam_in_anatomy"] == pytest.approx(2 / 3)
    loc = localisation(*args, plausible=np.array([True, False, True]))
    assert loc["cam_in_anatomy"] == pytest.approx(1.0) and loc["n_implausible_excluded"] == 1
    assert loc["per_label"]["Pneumonia"]["n_implausible_excluded"] == 1


def test_report_section_shows_the_counts_and_the_previews(tmp_path):
    import base64

    from pipeline.config import Paths
    from pipeline.report import _html_anatomy_masks

    paths, png = Paths(tmp_path), {s: b"\x89PNG " + s.encode() for s in ("train", "val", "test")}
    paths.segment_report.mkdir(parents=True)
    for split, data in png.items():
        paths.segment_preview(split).write_bytes(data)
    seg = {"implausible": 3, "blobs_removed": 7, "n_checked": 50, "implausible_by_split": {"test": 1, "train": 2},
           "previews": ["preview_train.png", "preview_val.png", "preview_test.png"]}
    out = _html_anatomy_masks(seg, paths)
    assert "<h2>Anatomy masks</h2>" in out and "<b>3</b> of 50" in out and "segment/implausible.csv" in out
    # each preview inside the page, in split order: the report shows them when copied alone
    uris = [f"data:image/png;base64,{base64.b64encode(data).decode()}" for data in png.values()]
    assert [out.find(u) for u in uris] == sorted(out.find(u) for u in uris) and all(u in out for u in uris)
    assert _html_anatomy_masks({"n_train": 4}, paths) == ""  # metrics of a run before the checks existed
