"""The cycle end to end on real films: Kermany through the adapter, the U-Net trained on JSRT's own
lungs and heart masks, the shortcut audit on, then cam -> enhance -> train -> evaluate, by `dvc repro`.

The films are found through CXR_REAL_DATA (default ../shared/data); under CI a missing folder fails
the test (tests/conftest.py `real_data`). Nothing is copied: the JSRT subset is a folder of links.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io import read_json
from tests.conftest import link_jsrt, tiny_params
from tests.helpers import make_project

N_FILMS = 300
N_JSRT = 80


def real_params(real_data: Path, jsrt: Path) -> dict:
    p = tiny_params()
    p["data"].update(source="kermany", root=str(real_data / "kermany-224" / "chest_xray"), limit=N_FILMS)
    p["segment"].update(mask_sources={"jsrt": str(jsrt)}, size=64, epochs=6, n_train=N_JSRT)
    p["train"].update(epochs=8, finetune_epochs=2, batch_size=16)   # ~10 steps an epoch on ~130 films
    p["evaluate"].update(n_cam_images=100)
    p["audit"] = {"enabled": True, "label": "Pneumonia", "p": 0.95, "size": 0.12, "seed": 0}
    p["sanity"]["label_permutation"] = False
    p["cycles"] = {"c1": {"id": 1, "prev": 0}}
    return p


@pytest.fixture(scope="module")
def real_run(real_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    jsrt = link_jsrt(real_data / "jsrt-scr", tmp / "jsrt", N_JSRT)
    project = make_project(tmp / "project", real_params(real_data, jsrt))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "report"], cwd=project, capture_output=True,
                          text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return project, time.monotonic() - t0


def test_real_films_run_the_whole_cycle(real_run):
    project, seconds = real_run
    manifest = pd.read_parquet(project / "data" / "audit" / "manifest.parquet")
    prepared = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    quarantine = pd.read_csv(project / "reports" / "quarantine.csv")
    assert len(prepared) == N_FILMS and len(quarantine) == 0            # no film lost to patient ids
    assert set(prepared["split"]) == {"train", "val", "test"} and set(prepared["Pneumonia"]) == {0.0, 1.0}
    n_test = int((prepared["split"] == "test").sum())
    assert (manifest["split"] == "test_shifted").sum() == n_test

    seg = read_json(project / "reports" / "segment" / "metrics.json")
    assert seg["sources"] == ["jsrt"]
    held = seg["held_out"]
    assert held["lungs"]["dice"] > 0.75 and held["heart"]["dice"] > 0.6, held   # 80 films, 6 epochs at 64 px

    audit = read_json(project / "data" / "audit" / "audit.json")
    assert audit["enabled"] and audit["splits"]["test"]["agreement"] > 0.85
    assert audit["splits"]["test_shifted"]["agreement"] < 0.15

    c0, c1 = (read_json(project / "reports" / "cycles" / f"c{k}" / "metrics.json") for k in (0, 1))
    for c in (c0, c1):
        for key in ("auroc_macro", "accuracy", "accuracy_shifted", "shortcut_gap", "cam_in_anatomy",
                    "marker_pointing"):
            assert c[key] is not None, (c["cycle"], key)
        assert c["shortcut_gap"] == pytest.approx(c["accuracy"] - c["accuracy_shifted"])
    assert c0["auroc_macro"] > 0.65                                   # it learned pneumonia from real films
    summary = read_json(project / "reports" / "summary.json")
    assert summary["audit"]["enabled"] and "Shortcut audit ON" in (project / "reports" / "index.html").read_text()
    # the record of how long it took, for the README (the suite's budget: about 4 min)
    print(f"real cycle end to end: {seconds:.0f} s; c0 {c0}; c1 {c1}")


def a_real_film(real_data: Path) -> Path:
    """A pneumonia film from Kermany's official test split, as downloaded (224-px JPEG)."""
    return sorted((real_data / "kermany-224" / "chest_xray" / "test" / "PNEUMONIA").glob("*.jpeg"))[0]


@pytest.fixture(scope="module")
def real_viewer(real_run):
    from tests.viewer_support import start_viewer

    viewer = start_viewer(real_run[0], "real", default_limits=True)
    yield viewer
    viewer.stop()


def test_the_viewer_explains_a_real_film_with_the_real_unet(real_viewer, real_data):
    """REST: a real film gets the real model's probability, its heatmap, the JSRT U-Net's lungs and heart
    and the heatmap's share inside them; the model card names the data, the mask source and the audit."""
    import httpx

    film = a_real_film(real_data)
    r = httpx.post(real_viewer.url + "/api/v1/predict", files={"file": (film.name, film.read_bytes())},
                   auth=real_viewer.auth, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    (label,) = body["predictions"]
    assert label["label"] == "Pneumonia" and 0 <= label["probability"] <= 1 and label["heatmap_png"]
    assert label["anatomy"] == "lungs" and 0 < label["anatomy_share"] <= 1
    assert body["anatomy_mask_png"] and body["model"]["source"] == "kermany"
    card = httpx.get(real_viewer.url + "/api/v1/model", auth=real_viewer.auth, timeout=30).json()["card"]
    assert card["data_source"] == "kermany" and "jsrt" in card["mask_source"]
    assert card["audit"].startswith("Shortcut audit ON")


def test_a_real_kermany_film_in_the_browser(real_viewer, real_data, browser):
    from tests.browser_support import artefacts, login, open_page

    context, page = open_page(browser, real_viewer.url)
    try:
        login(page)
        page.locator("#upload").wait_for()
        page.locator("#upload input[type=file]").set_input_files(str(a_real_film(real_data)))
        page.locator("#heatmap-latest img").wait_for()
        labels = [r.get_attribute("data-label") for r in page.locator("#probs tr[data-label]").all()]
        assert labels == ["Pneumonia"]
        assert page.locator("#anatomy img").get_attribute("src").startswith("data:image/png;base64,")
        page.locator("#model-card-box").get_by_text("Model card").click()
        page.locator("#model-card").get_by_text("Shortcut audit ON").first.wait_for()
        page.screenshot(path=str(artefacts() / "viewer_real_kermany.png"), full_page=True)
    finally:
        context.close()


def test_reviewed_pointing_game_on_real_films_plumbing(real_run):
    """A simulated reviewer whose evidence boxes are the U-Net's predicted lung fields on positive test
    films: `pointing_game_reviewed` runs end to end on real Kermany films. A plumbing check, not a
    clinical result (the boxes come from the pipeline's own masks)."""
    from pipeline.simulated_reviewer import mark_lung_fields

    project, _ = real_run
    n = mark_lung_fields(str(project), n=40, label="Pneumonia")
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "report"], cwd=project, capture_output=True,
                          text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert not ran & {"prepare", "segment", "audit", "train_baseline", "evaluate_baseline"}, ran
    review = read_json(project / "reports" / "review.json")
    assert n > 0 and review["n_marks"] == n
    for c in review["cycles"]:
        assert c["n_evidence_boxes"] == n and 0.0 <= c["pointing_game_reviewed"] <= 1.0
    print("real films, simulated lung-field reviewer: " + "; ".join(
        f"c{c['cycle']} pointing_game_reviewed {c['pointing_game_reviewed']:.3f} iou_reviewed {c['iou_reviewed']:.3f} "
        f"over {c['n_evidence_boxes']} boxes" for c in review["cycles"]))
