"""The viewer's shortcut warning (pipeline/viewer/shortcut_warning.py): a lift of the heatmap's energy
in the anatomy over the anatomy's share of the image, on synthetic heatmaps, on the phantom's markers,
and measured on the session's tiny project (pipeline/viewer/warning_check.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.viewer.shortcut_warning import SHORTCUT_LIFT, anatomy_fraction, heatmap_lift, lift, warns

S = 64


def blob(cy: float, cx: float, sigma: float = 3.0, size: int = S) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def lungs(size: int = S) -> np.ndarray:
    """Two lung fields covering about a quarter of the film."""
    m = np.zeros((size, size), bool)
    m[size // 4: 3 * size // 4, size // 8: 3 * size // 8 + 2] = True
    m[size // 4: 3 * size // 4, 5 * size // 8 - 2: 7 * size // 8] = True
    return m


def test_lift_is_the_energy_share_over_the_area_share():
    region = lungs()
    fraction = anatomy_fraction(region)
    assert 0.2 < fraction < 0.3
    assert heatmap_lift(np.ones((S, S), np.float32), region) == pytest.approx(1.0)   # no preference
    inside = blob(S / 2, S / 4)
    assert heatmap_lift(inside, region) == pytest.approx(1 / fraction, rel=0.05)     # all of it in the lungs
    assert heatmap_lift(blob(3, 3, 1.5), region) == pytest.approx(0.0, abs=1e-3)      # a corner marker
    assert lift(0.5, 0.25) == 2.0 and lift(None, 0.25) is None and lift(0.5, None) is None
    assert heatmap_lift(np.zeros((S, S), np.float32), region) is None                # an empty heatmap
    assert anatomy_fraction(np.zeros((S, S), bool)) is None                          # no anatomy found


def test_the_warning_fires_below_the_cut_off_whatever_the_anatomy_covers():
    assert warns(None) is None
    assert warns(SHORTCUT_LIFT - 1e-6) and not warns(SHORTCUT_LIFT)
    heart = np.zeros((S, S), bool)
    heart[30:44, 26:40] = True                    # ~5 % of the film
    # 42 % of the energy on the heart: the old fixed 0.5 warned; it is 8x an even spread
    cam = 0.42 * blob(37, 33, 3) / blob(37, 33, 3).sum() + 0.58 * np.ones((S, S), np.float32) / S ** 2
    share = float(cam[heart].sum() / cam.sum())
    assert share == pytest.approx(0.42 + 0.58 * heart.mean(), abs=0.02) and share < 0.5
    assert not warns(heatmap_lift(cam, heart))
    # the same heatmap judged against the whole body would be no better than chance: it warns there
    body = np.ones((S, S), bool)
    body[:, :8] = False
    assert warns(heatmap_lift(blob(4, 4, 2), body))
    # a heatmap split between the lungs and a marker outside them: warns once the marker takes most of it
    region = lungs()
    for on_marker, expected in ((0.2, False), (0.9, True)):
        mix = (1 - on_marker) * blob(S / 2, S / 4) / blob(S / 2, S / 4).sum() + on_marker * blob(3, 3, 1.5) / blob(3, 3, 1.5).sum()
        assert warns(heatmap_lift(mix, region)) is expected


@pytest.mark.parametrize("size", [64, 128])
def test_the_phantom_markers_are_found_where_the_phantom_drew_them(size):
    from pipeline.data import phantom
    from pipeline.viewer.warning_check import MARKER_CORNERS, phantom_marker_box

    found, missed, false = 0, 0, 0
    for k in range(30):
        rng = np.random.default_rng([7, k])
        anatomy = phantom.sample_patient(rng)
        drawn = {"Pneumonia": bool(k % 2), "Cardiomegaly": bool(k % 3)}
        img = phantom.render(rng, size, anatomy, {lab: bool(rng.random() < 0.4) for lab in phantom.PHANTOM_LABELS},
                             drawn)
        for label, kind in phantom.SHORTCUT_MARKERS.items():
            box = phantom_marker_box(img.image, MARKER_CORNERS[kind])
            truth = img.marker_masks[label]
            if not drawn[label]:
                false += box is not None
                continue
            ys, xs = np.nonzero(truth)
            t = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if box is None:
                missed += 1
                continue
            b = (box[0], box[1], box[0] + box[2], box[1] + box[3])
            inter = max(0, min(t[2], b[2]) - max(t[0], b[0])) * max(0, min(t[3], b[3]) - max(t[1], b[1]))
            union = (t[2] - t[0]) * (t[3] - t[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            found += inter / union >= 0.5
    n_drawn = sum(bool(k % 2) for k in range(30)) + sum(bool(k % 3) for k in range(30))
    assert missed == 0 and false == 0 and found == n_drawn


@pytest.fixture(scope="module")
def project():
    from tests.viewer_support import trained_project

    return trained_project()


def test_on_the_tiny_project_a_heatmap_on_the_marker_warns_and_one_on_the_anatomy_does_not(project):
    """The rule on the run's own films, U-Net anatomy and phantom markers (the tiny models are too weak
    to look at the markers themselves, so the heatmaps are placed by hand)."""
    from pipeline.config import Paths, load_params
    from pipeline.data.record import decode_anatomy
    from pipeline.data.store import ArrayStore
    from pipeline.viewer.inference import ServedModels, anatomy_of_label
    from pipeline.viewer.warning_check import marker_masks

    paths = Paths(project)
    params = load_params(paths.params)
    manifest = pd.read_parquet(paths.manifest)
    rows = np.flatnonzero(manifest["split"].to_numpy() == "test")
    frame = manifest.iloc[rows].reset_index(drop=True)
    images = ArrayStore(paths.images).read(rows)
    markers = marker_masks(paths, params, frame, images)
    flagged = (frame["marker_Pneumonia"].astype(int) | frame["marker_Cardiomegaly"].astype(int)).astype(bool)
    assert [m is not None for m in markers] == flagged.tolist() and flagged.sum() >= 3
    models = ServedModels(project)
    models.load()
    judged = 0
    for k in np.flatnonzero(flagged):
        anatomy = models._mask(images[k])
        ys, xs = np.nonzero(markers[k])
        for label in ("Pneumonia", "Cardiomegaly"):
            region = decode_anatomy(anatomy, anatomy_of_label(label))
            if anatomy_fraction(region) is None:
                continue
            on_marker = blob(ys.mean(), xs.mean(), 1.5, images.shape[-1])
            cy, cx = (float(v.mean()) for v in np.nonzero(region))
            on_anatomy = blob(cy, cx, 2.0, images.shape[-1]) * region
            assert warns(heatmap_lift(on_marker, region)), (k, label)
            assert not warns(heatmap_lift(on_anatomy, region)), (k, label)
            judged += 1
    assert judged >= 6


def test_the_measurement_script_reports_both_rates_on_the_tiny_project(project, capsys):
    from pipeline.viewer.warning_check import main

    main(["--root", str(project), "--limit", "12"])
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["films"] == 12 and result["lift_below"] == SHORTCUT_LIFT
    from pipeline.config import Paths

    manifest = pd.read_parquet(Paths(project).manifest)
    test = manifest[manifest["split"] == "test"].head(12)
    assert result["films_with_markers"] == int((test["marker_Pneumonia"].astype(bool)
                                                | test["marker_Cardiomegaly"].astype(bool)).sum())
    assert result["marker_reach_px"] == 3 * 64 // 8    # three cells of TinyVGG's 8 x 8 grid at 64 px
    for key in ("served", "cycle0"):
        rate = result[key]
        assert rate["calls"] >= rate["warned"] >= 0
        assert rate["on_marker_strict"]["calls"] <= rate["on_marker"]["calls"] <= rate["calls"]
        assert sum(v["calls"] for v in rate["by_label"].values()) == rate["calls"]
        assert sum(v["warned"] for v in rate["by_label"].values()) == rate["warned"]
        assert rate["warned_share"] is None or rate["warned_share"] == pytest.approx(rate["warned"] / rate["calls"],
                                                                                      abs=1e-4)
    assert result["cycle0"]["cycle"] == 0
    assert "positive calls" in out.err and "on a marker" in out.err


@pytest.mark.slow
def test_on_a_default_run_the_refined_model_rarely_warns_and_cycle_0_warns_on_its_marker_calls():
    """The issue's two requirements, on a finished default phantom run (`make run`; about 13 min):
    CXR_WARNING_RUN names its root (skipped without one; `pytest -m slow` selects it)."""
    import os
    from pathlib import Path

    from pipeline.viewer.warning_check import measure

    root = os.environ.get("CXR_WARNING_RUN")
    if not root or not (Path(root) / "models" / "latest.json").is_file():
        pytest.skip("set CXR_WARNING_RUN to the root of a finished default run")
    result = measure(root)
    served, base = result["served"], result["cycle0"]
    assert served["cycle"] > 0 and served["calls"] >= 50
    assert served["warned_share"] < 0.10, served
    assert base["on_marker"]["calls"] >= 20 and base["on_marker"]["warned_share"] > 0.5, base["on_marker"]
