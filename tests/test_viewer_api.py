"""The viewer's REST API and login, over real HTTP against the running app (tests/viewer_support.py)."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.viewer_support import (PASSWORD, USER, bad_files, dicom, film, jpeg, png, running_viewer, serve_cycle,
                                  start_viewer, trained_project, untrained_project)

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def viewer():
    return running_viewer()


def predict(viewer, data: bytes, name: str = "image.bin", auth=(USER, PASSWORD), **params) -> httpx.Response:
    return httpx.post(viewer.url + "/api/v1/predict", files={"file": (name, data)}, auth=auth, params=params,
                      timeout=60)


def test_health_needs_no_login(viewer):
    r = httpx.get(viewer.url + "/api/v1/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model_loaded"] is True


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/model"), ("POST", "/api/v1/predict"), ("GET", "/config"), ("GET", "/gradio_api/info"),
    ("POST", "/gradio_api/upload"), ("POST", "/gradio_api/queue/join"), ("GET", "/gradio_api/queue/status"),
    ("GET", "/gradio_api/file=/etc/hostname"), ("GET", "/monitoring"),
])
def test_every_data_route_refuses_an_anonymous_request(viewer, method, path):
    r = httpx.request(method, viewer.url + path, timeout=30)
    assert r.status_code == 401, (path, r.status_code, r.text[:200])


def test_wrong_password_and_malformed_basic_header_are_refused(viewer):
    assert predict(viewer, png(film()), auth=(USER, "wrong")).status_code == 401
    r = httpx.get(viewer.url + "/api/v1/model", headers={"Authorization": "Basic !!notbase64"})
    assert r.status_code == 401 and r.json() == {"error": "authentication required (HTTP Basic)"}
    assert r.headers["www-authenticate"].startswith("Basic")


def test_no_api_docs_and_no_workspace_files(viewer):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(viewer.url + path, auth=(USER, PASSWORD)).status_code in (401, 404)
    with httpx.Client(base_url=viewer.url, timeout=30) as c:
        assert c.post("/login", data={"username": USER, "password": PASSWORD}).status_code == 200
        for target in (viewer.root / "params.yaml", viewer.root / "models" / "latest.json"):
            r = c.get(f"/gradio_api/file={target}")
            assert r.status_code in (403, 404), r.status_code
            assert b"checkpoint" not in r.content and b"phantom" not in r.content


def test_prediction_schema(viewer):
    r = predict(viewer, png(film()), "film.png")
    assert r.status_code == 200, r.text
    body = r.json()
    model = body["model"]
    labels = model["labels"]
    assert model["cycle"] >= 0 and model["baseline_cycle"] == 0 and model["arch"] and model["checkpoint_sha256"]
    preds = body["predictions"]
    assert [p["label"] for p in preds] == sorted(labels, key=lambda lab: -next(
        q["probability"] for q in preds if q["label"] == lab)) and sorted(p["label"] for p in preds) == sorted(labels)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    size = model["image_size"]
    for p in preds:
        assert 0 <= p["probability"] <= 1 and 0 <= p["threshold"] <= 1
        assert p["positive"] == (p["probability"] >= p["threshold"])
        assert p["anatomy"] in ("lungs", "heart", "both")
        assert p["anatomy_share"] is None or 0 <= p["anatomy_share"] <= 1
        # the warning is the lift rule (pipeline/viewer/shortcut_warning.py): share / anatomy's area share < 1
        assert p["anatomy_fraction"] is None or 0 < p["anatomy_fraction"] <= 1
        if p["anatomy_share"] is None or p["anatomy_fraction"] is None:
            assert p["anatomy_lift"] is None and p["shortcut_warning"] is None
        else:
            assert abs(p["anatomy_lift"] - p["anatomy_share"] / p["anatomy_fraction"]) < 2e-3
            assert p["shortcut_warning"] == (p["anatomy_lift"] < body["shortcut_warning_rule"]["lift_below"])
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(p["heatmap_png"]))))
        assert heat.shape == (size, size) and heat.dtype == np.uint8
        assert p["baseline"]["cycle"] == 0 and "heatmap_png" in p["baseline"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["anatomy_mask_png"]))))
    assert mask.shape == (size, size) and set(np.unique(mask)) <= {0, 1, 2, 3}
    assert body["image"] == {"format": "png", "view": None, "width": 200, "height": 200}
    assert "not a medical device" in body["notice"]
    # without heatmaps and without the baseline: same probabilities
    lean = predict(viewer, png(film()), heatmaps="false", baseline="false").json()
    assert "heatmap_png" not in lean["predictions"][0] and "baseline" not in lean["predictions"][0]
    assert {p["label"]: p["probability"] for p in lean["predictions"]} == {p["label"]: p["probability"] for p in preds}


def test_png_jpeg_and_dicom_are_all_read(viewer):
    img = film(seed=5)
    out = {}
    for name, data in (("png", png(img)), ("jpeg", jpeg(img)), ("dicom", dicom(img))):
        r = predict(viewer, data)
        assert r.status_code == 200, (name, r.text)
        assert r.json()["image"]["format"] == name
        out[name] = {p["label"]: p["probability"] for p in r.json()["predictions"]}
    for lab, p in out["png"].items():
        assert abs(out["jpeg"][lab] - p) < 0.05


def test_monochrome1_and_monochrome2_twins_give_the_same_probabilities(viewer):
    img = film(seed=7)
    one, two = (predict(viewer, dicom(img, monochrome1=m)).json() for m in (True, False))
    assert {p["label"]: p["probability"] for p in one["predictions"]} == \
           {p["label"]: p["probability"] for p in two["predictions"]}
    assert [p["heatmap_png"] for p in one["predictions"]] == [p["heatmap_png"] for p in two["predictions"]]


def test_dicom_identifiers_are_never_returned_or_logged(viewer):
    r = predict(viewer, dicom(film(seed=8), patient_id="PID-8842-SECRET", patient_name="ZEBEDEE^MARGARETHE"),
                "ZEBEDEE_MARGARETHE.dcm")
    assert r.status_code == 200
    text = r.text + viewer.log.read_text()
    for secret in ("PID-8842-SECRET", "ZEBEDEE", "MARGARETHE"):
        assert secret not in text


@pytest.mark.parametrize("case", list(bad_files()))
def test_bad_files_get_a_json_4xx_and_the_server_stays_up(viewer, case):
    before = sorted(p for p in viewer.temp_dir.rglob("*") if p.is_file())
    r = predict(viewer, bad_files()[case], "upload.dcm")
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]
    assert "Traceback" not in r.text and "File \"" not in r.text
    assert "PID-8842-SECRET" not in r.text and "ZEBEDEE" not in r.text
    assert httpx.get(viewer.url + "/api/v1/health").json()["status"] == "ok"
    assert sorted(p for p in viewer.temp_dir.rglob("*") if p.is_file()) == before  # nothing written


def test_request_errors_are_json(viewer):
    too_big = b"\x89PNG" + b"\0" * (3 * 1024 * 1024)        # over CXR_MAX_UPLOAD_MB = 2
    r = predict(viewer, too_big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = httpx.post(viewer.url + "/api/v1/predict", content=b"raw", auth=(USER, PASSWORD))
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = httpx.post(viewer.url + "/api/v1/predict", files={"other": ("x.png", b"abc")}, auth=(USER, PASSWORD))
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    assert predict(viewer, b"").status_code == 400
    r = predict(viewer, png(film()), baseline="maybe")
    assert r.status_code == 422 and "baseline" in r.json()["error"]


def test_model_card(viewer):
    r = httpx.get(viewer.url + "/api/v1/model", auth=(USER, PASSWORD))
    assert r.status_code == 200
    card = r.json()["card"]
    latest = json.loads((viewer.root / "models" / "latest.json").read_text())
    assert card["cycle"] == latest["cycle"] and card["data_source"] == "phantom" and card["baseline_cycle"] == 0
    metrics = json.loads((viewer.root / "reports" / "cycles" / f"c{card['cycle']}" / "metrics.json").read_text())
    assert card["test_metrics"]["auroc_macro"] == metrics["auroc_macro"]
    assert card["sanity_flag"] == (metrics["sanity_rank_corr"] >= 0.2)
    permutation = json.loads((viewer.root / "reports" / "sanity.json").read_text())["label_permutation"]
    rho = permutation["by_cycle"][f"c{card['cycle']}"]
    assert card["label_permutation"]["rank_corr"] == rho
    assert card["label_permutation_flag"] == (rho is None or rho >= 0.2)
    assert card["dvc_md5"] and card["git_revision"]
    assert "not a medical device" in card["notice"] and "not a lesion outline" in card["notice"]
    assert card["intended_use"] and card["limitations"]
    # the shortcut warning's rule, in the card and beside it
    assert card["shortcut_warning"] == r.json()["shortcut_warning_rule"]["rule"]
    assert f"below {r.json()['shortcut_warning_rule']['lift_below']:g}" in card["shortcut_warning"]


def test_without_a_model_the_viewer_says_how_to_train_one():
    v = start_viewer(untrained_project(), "untrained")
    try:
        health = httpx.get(v.url + "/api/v1/health").json()
        assert health["status"] == "no_model" and "make run" in health["message"]
        r = predict(v, png(film()))
        assert r.status_code == 503 and "make run" in r.json()["error"]
        assert httpx.get(v.url + "/", timeout=30).status_code == 200  # the UI (login page) still serves
    finally:
        v.stop()
    assert v.proc.returncode is not None


def test_the_users_file_holds_salted_hashes_only(tmp_path):
    from pipeline.viewer.auth import Users, add_user, hash_password

    path = tmp_path / "users.json"
    add_user(path, "dr-who", "tardis-1963")
    subprocess.run([sys.executable, "-m", "pipeline.viewer.auth", "add", "nurse", "--file", str(path),
                    "--password-stdin"], input="pass-word-2\n", text=True, check=True, capture_output=True)
    text = path.read_text()
    assert "tardis-1963" not in text and "pass-word-2" not in text
    assert (path.stat().st_mode & 0o777) == 0o600
    users = Users(hashed=json.loads(text)["users"])
    assert users.check("dr-who", "tardis-1963") and users.check("nurse", "pass-word-2")
    assert not users.check("dr-who", "tardis-1964") and not users.check("nobody", "tardis-1963")
    assert hash_password("same") != hash_password("same")  # a fresh salt each time
    with pytest.raises(ValueError):
        add_user(path, "short", "abc")


def test_a_newly_trained_model_is_served_without_a_restart(tmp_path):
    """models/latest.json changing (a new cycle, a `dvc checkout`) swaps the served model in place."""
    import shutil

    from pipeline.viewer.inference import ServedModels

    src, project = trained_project(), tmp_path / "p"
    shutil.copytree(src / "models", project / "models")
    shutil.copy(src / "params.yaml", project / "params.yaml")
    serve_cycle(project, 1)
    models = ServedModels(project)
    first = models.analyse(png(film()))
    assert first.latest.cycle == 1
    info = json.loads((project / "models" / "latest.json").read_text())
    (project / "models" / "latest.json").write_text(json.dumps({**info, "cycle": 0, "checkpoint": info["baseline"]}))
    second = models.analyse(png(film()))
    assert second.latest.cycle == 0 and models.latest.cycle == 0
    (project / "models" / "latest.json").write_text(json.dumps({**info, "checkpoint": "models/c9/missing"}))
    third = models.analyse(png(film()))   # a broken update keeps the loaded model serving
    assert third.latest.cycle == 0
