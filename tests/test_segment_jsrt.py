"""The anatomy U-Net on real JSRT films with their SCR masks (a 40-film subset, linked, never copied):
fitted at segment.size, scored at the masks' own 1024 px, and the plausibility checks on real anatomy.

Needs the real films (CXR_REAL_DATA, default ../shared/data): skipped without them, failed under CI.
"""

import numpy as np
import pytest

from pipeline.anatomy_checks import check, clean_and_check, postprocess
from pipeline.config import DataParams, Params, SegmentParams
from pipeline.data.record import HEART_BIT, LUNGS_BIT
from pipeline.segmentation import evaluate_native, mask_sets, probabilities, train_unet
from tests.conftest import link_jsrt
from tests.fixtures.anatomy import broken_variants

N_FILMS = 40


@pytest.fixture(scope="module")
def jsrt_sets(real_data, tmp_path_factory):
    root = link_jsrt(real_data / "jsrt-scr", tmp_path_factory.mktemp("jsrt"), N_FILMS)
    params = Params(data=DataParams(image_size=128), segment=SegmentParams(
        mask_sources={"jsrt": str(root)}, size=64, epochs=3, batch_size=8, n_train=24))
    return params, *mask_sets(params)


def test_films_are_fitted_at_segment_size_and_scored_at_native_resolution(jsrt_sets):
    params, train, held, quarantined = jsrt_sets
    assert not quarantined and len(train.images) == 24 and len(held.images) >= 3
    assert train.images.shape[1:] == (64, 64) and held.masks.shape[1:] == (64, 64)  # segment.size, not 128
    native = held.native[0]()
    assert native.shape == (1024, 1024)  # the SCR masks' own side
    for bit in (LUNGS_BIT, HEART_BIT):  # the same fit: shrunk, the native masks agree with the 64-px ones
        a, b = (held.masks[0] & bit) > 0, ((native & bit) > 0).reshape(64, 16, 64, 16).mean(axis=(1, 3)) > 0.5
        assert (a & b).sum() / (a | b).sum() > 0.9

    net = train_unet(params.segment, train.images, train.masks, train.known)
    scores = evaluate_native(net, held, params.segment.size)
    assert scores["resolution"] == 1024 and scores["n_images"] == len(held.images)
    # the same figure by hand: probabilities upsampled 64 -> 1024, thresholded, against the native masks
    inter = total = 0
    for i in range(len(held.images)):
        pred = probabilities(net, held.images[i:i + 1], 64, 1024)[0, 0].numpy() > 0.5
        truth = (held.native[i]() & LUNGS_BIT) > 0
        inter, total = inter + (pred & truth).sum(), total + pred.sum() + truth.sum()
    assert scores["lungs"]["dice"] == pytest.approx(2 * inter / total, abs=1e-4)
    assert scores["lungs"]["dice"] > 0.5 and scores["heart"]["n_images"] == len(held.images)  # 3 epochs: a rough net


def test_real_ground_truth_is_plausible_and_broken_real_masks_are_flagged(jsrt_sets):
    _, train, held, _ = jsrt_sets
    _, checks = clean_and_check(np.concatenate([train.masks, held.masks]))
    assert np.mean([c.plausible for c in checks]) >= 0.95, [c.reason for c in checks if not c.plausible]
    _, native_checks = clean_and_check(np.stack([f() for f in held.native]))
    assert all(c.plausible for c in native_checks), [c.reason for c in native_checks]

    v = broken_variants(held.native[0]())
    assert check(*postprocess(v["one lung"])).reason.startswith("one lung")
    cleaned, removed = postprocess(v["blob"])
    assert removed and check(cleaned, removed).plausible
    c = check(*postprocess(v["heart outside thorax"]))
    assert not c.plausible and "heart outside thorax" in c.reason
