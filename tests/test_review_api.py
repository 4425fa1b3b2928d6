"""Review mode over real HTTP (tests/review_support.py): `GET /api/v1/review/next` and
`POST /api/v1/feedback` behind the reviewer role, their validation (JSON 4xx for anything invalid),
eight reviewers posting at once, and the review tab's Gradio events refused to a viewer-role user,
attacked as tests/test_viewer_attacks.py attacks the predict routes.

The viewer runs over a copy of the session's trained_project, so this module joins its xdist group
(tests/conftest.py groups modules by that name)."""
from __future__ import annotations

import base64
import io
import json
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import feedback
from pipeline.config import Paths
from pipeline.viewer.shortcut_warning import SHORTCUT_LIFT
from tests.review_support import API_PASSWORD, API_REVIEWER, REVIEWERS, review_viewer
from tests.viewer_support import PASSWORD, USER

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
LABELS = sorted(["Cardiomegaly", "Lung Lesion", "Pneumonia", "Pleural Effusion"])


@pytest.fixture(scope="module")
def viewer():
    return review_viewer()


def records(viewer) -> list[dict]:
    return feedback.read_records(Paths(viewer.root))


def post(viewer, body, auth=(API_REVIEWER, API_PASSWORD), **kw) -> httpx.Response:
    if "content" not in kw:
        kw["json"] = body
    return httpx.post(viewer.url + "/api/v1/feedback", auth=auth, timeout=60, **kw)


def review_ids(viewer) -> list[str]:
    manifest = pd.read_parquet(Paths(viewer.root).manifest)
    return manifest.loc[manifest["split"].isin(["val", "test"]), "image_id"].astype(str).tolist()


def mark(image_id: str, label: str = "Pneumonia", **kw) -> dict:
    return {"image_id": image_id, "label": label, "call": "agree", "heatmap": "finding", **kw}


def test_review_routes_need_a_login_and_the_reviewer_role(viewer):
    for method, path in (("GET", "/api/v1/review/next"), ("POST", "/api/v1/feedback")):
        anon = httpx.request(method, viewer.url + path, timeout=30)
        assert anon.status_code == 401 and anon.json()["error"].startswith("authentication required")
        assert anon.headers["www-authenticate"].startswith("Basic")
        wrong = httpx.request(method, viewer.url + path, auth=(API_REVIEWER, "wrong-password"), timeout=30)
        assert wrong.status_code == 401
        refused = httpx.request(method, viewer.url + path, auth=(USER, PASSWORD), timeout=30,
                                json={"marks": [mark(review_ids(viewer)[0])]} if method == "POST" else None)
        assert refused.status_code == 403, refused.text
        assert refused.json() == {"error": "the review routes need the reviewer role"}
    assert not [r for r in records(viewer) if r["reviewer"] == USER]
    # the viewer-role user still predicts, and reads the model with the warning rule
    model = httpx.get(viewer.url + "/api/v1/model", auth=(USER, PASSWORD), timeout=30)
    assert model.status_code == 200 and model.json()["shortcut_warning_rule"]["lift_below"] == SHORTCUT_LIFT


def test_next_gives_the_first_unfinished_film_with_its_analysis_and_progress(viewer):
    auth = (API_REVIEWER, API_PASSWORD)
    ids = review_ids(viewer)
    r = httpx.get(viewer.url + "/api/v1/review/next", auth=auth, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    done_before = body["reviewed"]
    assert body["total"] == len(ids) and body["image_id"] in ids and body["split"] in ("val", "test")
    assert body["position"] == ids.index(body["image_id"]) + 1
    assert sorted(p["label"] for p in body["predictions"]) == LABELS
    size = body["model"]["image_size"]
    for p in body["predictions"]:
        assert p["positive"] == (p["probability"] >= p["threshold"]) and "heatmap_png" in p
        assert p["baseline"]["cycle"] == 0 and "heatmap_png" in p["baseline"]
        assert p["shortcut_warning"] in (True, False, None)
    film = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_png"]))))
    assert film.shape == (size, size)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["anatomy_mask_png"]))))
    assert mask.shape == (size, size) and set(np.unique(mask)) <= {0, 1, 2, 3}
    assert body["image"]["format"] == "prepared" and "not a medical device" in body["notice"]
    first = body["image_id"]
    # mark every label but one: still this film; the last one: the next film comes, one more reviewed
    saved = post(viewer, {"marks": [mark(first, lab) for lab in LABELS[:-1]]})
    assert saved.status_code == 201, saved.text
    again = httpx.get(viewer.url + "/api/v1/review/next", auth=auth, params={"heatmaps": "false"}, timeout=60).json()
    assert again["image_id"] == first and "heatmap_png" not in again["predictions"][0]
    assert sorted(m["label"] for m in again["marks"]) == LABELS[:-1]
    assert {m["id"] for m in again["marks"]} == set(saved.json()["ids"])
    assert post(viewer, {"marks": [mark(first, LABELS[-1], call="disagree", heatmap="shortcut")]}).status_code == 201
    after = httpx.get(viewer.url + "/api/v1/review/next", auth=auth, timeout=60).json()
    assert after["image_id"] != first and after["reviewed"] == done_before + 1
    skipped = httpx.get(viewer.url + "/api/v1/review/next", auth=auth, params={"after": after["image_id"]},
                        timeout=60).json()
    assert ids.index(skipped["image_id"]) > ids.index(after["image_id"])
    # `after` is only ever looked up among the run's ids: anything else starts from the first film
    odd = httpx.get(viewer.url + "/api/v1/review/next", auth=auth, params={"after": "../../params.yaml"},
                    timeout=60)
    assert odd.status_code == 200 and odd.json()["image_id"] == after["image_id"] and b"image_size:" not in odd.content
    # another reviewer's progress is their own
    other = httpx.get(viewer.url + "/api/v1/review/next", auth=("rev7", REVIEWERS["rev7"]), timeout=60).json()
    assert other["reviewed"] == 0
    assert {m["id"] for m in other["marks"]} <= {r["id"] for r in records(viewer) if r["reviewer"] == "rev7"}


def test_a_retraction_is_a_new_record_and_only_the_author_may_make_it(viewer):
    ids = review_ids(viewer)
    (mark_id,) = post(viewer, {"marks": [mark(ids[-1], "Cardiomegaly")]}).json()["ids"]
    n = len(records(viewer))
    other = post(viewer, {"retract": [mark_id]}, auth=("rev6", REVIEWERS["rev6"]))
    assert other.status_code == 403 and "another reviewer" in other.json()["error"]
    ok = post(viewer, {"retract": [mark_id]})
    assert ok.status_code == 201 and len(ok.json()["retractions"]) == 1 and ok.json()["ids"] == []
    log = records(viewer)
    assert len(log) == n + 1 and log[-1]["type"] == "retraction" and log[-1]["retracts"] == mark_id
    assert any(r["id"] == mark_id for r in log)                 # the mark itself is still there
    marks = feedback.load_feedback(Paths(viewer.root))
    assert mark_id not in set(marks["id"])


BOX = {"x": 1, "y": 1, "w": 4, "h": 4, "kind": "shortcut", "what": "marker"}


@pytest.mark.parametrize("name,body,status,message", [
    ("unknown label", {"marks": [mark("{id}", "Edema")]}, 422, "label must be one of"),
    ("box outside the image", {"marks": [mark("{id}", boxes=[{**BOX, "x": 62}])]}, 422, "not inside"),
    ("box of no size", {"marks": [mark("{id}", boxes=[{**BOX, "w": 0}])]}, 422, "must be positive"),
    ("unknown image id", {"marks": [mark("P99999_9")]}, 422, "no film"),
    ("a train film", {"marks": [mark("{train}")]}, 422, "no film"),
    ("a file name for an image id", {"marks": [mark("ZEBEDEE_MARGARETHE.dcm")]}, 422, "no film"),
    ("a path for an image id", {"marks": [mark("../../params.yaml")]}, 422, "no film"),
    ("bad call", {"marks": [mark("{id}", call="yes")]}, 422, "call must be one of"),
    ("bad heatmap verdict", {"marks": [mark("{id}", heatmap="lungs")]}, 422, "heatmap must be one of"),
    ("marks not a list", {"marks": mark("{id}")}, 422, "must be lists"),
    ("a mark not an object", {"marks": ["{id}"]}, 422, "must be an object"),
    ("label of the wrong type", {"marks": [mark("{id}", label=["Pneumonia"])]}, 422, "label must be one of"),
    ("box coordinate a string", {"marks": [mark("{id}", boxes=[{**BOX, "x": "1"}])]}, 422, "integer"),
    ("boxes not a list", {"marks": [mark("{id}", boxes="1,1,4,4")]}, 422, "must be a list"),
    ("an extra field", {"marks": [{**mark("{id}"), "patient_name": "DOE^JOHN"}]}, 422, "unknown field"),
    ("an unknown top-level field", {"marks": [], "delete": ["*"]}, 422, "unknown field"),
    ("nothing", {}, 422, "nothing to save"),
    ("a list body", [mark("{id}")], 400, "JSON object"),
    ("a retraction of nothing", {"retract": ["f" * 32]}, 422, "no mark with id"),
    ("too many marks", {"marks": [mark("{id}")] * 501}, 422, "at most 500"),
])
def test_invalid_feedback_gets_a_json_4xx_and_writes_nothing(viewer, name, body, status, message):
    ids = review_ids(viewer)
    manifest = pd.read_parquet(Paths(viewer.root).manifest)
    train = str(manifest.loc[manifest["split"] == "train", "image_id"].iloc[0])
    text = json.dumps(body).replace("{id}", ids[0]).replace("{train}", train)
    before = len(records(viewer))
    r = post(viewer, None, content=text, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text)
    assert message in r.json()["error"], (name, r.json())
    assert len(records(viewer)) == before


def test_malformed_and_oversized_bodies_are_refused(viewer):
    before = len(records(viewer))
    bad_json = post(viewer, None, content=b'{"marks": [', headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json() == {"error": "the body is not valid JSON"}
    not_utf8 = post(viewer, None, content=b'{"marks": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert not_utf8.status_code == 400
    form = post(viewer, None, content=b"marks=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    big = json.dumps({"marks": [mark(review_ids(viewer)[0])], "pad": "x" * 300_000})
    declared = post(viewer, None, content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and "exceeds the limit" in declared.json()["error"]

    def chunks():   # no length declared: refused as it streams past the limit
        yield b'{"marks": [], "pad": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}'
    streamed = post(viewer, None, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    # an anonymous client cannot make the server read a large body either
    host, port = viewer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /api/v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000\r\n\r\n" + b"x" * 1000)
        head = s.recv(4096)
    assert head.split(b" ")[1] in (b"401", b"413"), head[:200]
    assert len(records(viewer)) == before


def test_eight_reviewers_posting_fifty_marks_each_at_once_lose_nothing(viewer):
    ids = review_ids(viewer)

    def reviewer(name: str) -> list[str]:
        out = []
        with httpx.Client(base_url=viewer.url, auth=(name, REVIEWERS[name]), timeout=120) as c:
            for k in range(50):
                r = c.post("/api/v1/feedback", json={"marks": [mark(ids[k % len(ids)], LABELS[k % 4],
                                                                    call=("agree", "disagree")[k % 2])]})
                assert r.status_code == 201, r.text
                out += r.json()["ids"]
        return out

    with ThreadPoolExecutor(8) as pool:
        returned = dict(zip(REVIEWERS, pool.map(reviewer, REVIEWERS)))
    log = records(viewer)
    lines = Paths(viewer.root).feedback_log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])   # no torn or interleaved line
    for name, got in returned.items():
        mine = [r["id"] for r in log if r["reviewer"] == name]
        assert len(got) == 50 and sorted(mine) == sorted(got), name
    sha = httpx.get(viewer.url + "/api/v1/model", auth=(USER, PASSWORD), timeout=30).json()["checkpoint_sha256"]
    assert {r["model_sha256"] for r in log if r["reviewer"] in REVIEWERS} == {sha}


# -- the review tab's Gradio events ---------------------------------------------------------------

@contextmanager
def session(viewer, user: str, password: str):
    """A client holding a Gradio session cookie."""
    with httpx.Client(base_url=viewer.url, timeout=120) as c:
        r = c.post("/login", data={"username": user, "password": password})
        assert r.status_code == 200, r.text
        yield c


def review_events(client: httpx.Client) -> dict[str, dict]:
    """The review tab's events by their trigger's elem_id (the page load's as 'load'), from /config."""
    cfg = client.get("/config").json()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in cfg["components"]}
    out = {}
    for k, dep in enumerate(cfg["dependencies"]):
        for target, event in dep["targets"]:
            name = ids.get(target) if event != "load" else "load"
            if name == "load" and len(dep["outputs"]) < 10:
                continue   # the predict tab's load (status and model card)
            if name and (name.startswith(("review-", "box-")) or name == "load"):
                out[name] = {"fn": dep.get("id", k), "trigger": target, "queue": dep["queue"],
                             "inputs": len(dep["inputs"])}
    return out


def call(client: httpx.Client, dep: dict, data: list, event_data=None) -> tuple[bool, str]:
    """Send one event as the browser does (the queue, or a direct call for an unqueued event);
    (success, the whole answer as text)."""
    sess = uuid.uuid4().hex[:10]
    body = {"data": data, "fn_index": dep["fn"], "trigger_id": dep["trigger"], "session_hash": sess,
            "event_data": event_data}
    if not dep["queue"]:
        r = client.post("/gradio_api/run/predict", json=body)
        return r.status_code == 200 and "error" not in r.json(), r.text
    r = client.post("/gradio_api/queue/join", json=body)
    assert r.status_code == 200, r.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": sess}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") in ("process_completed", "unexpected_error", "close_stream"):
                    return bool(msg.get("success")), json.dumps(msg)
    raise AssertionError("the event never completed")


def test_the_review_tab_events_refuse_a_viewer_role_session(viewer):
    ids = review_ids(viewer)
    with session(viewer, API_REVIEWER, API_PASSWORD) as rev:
        events = review_events(rev)
        assert {"load", "review-next", "review-prev", "review-next-unreviewed", "review-save", "review-label",
                "review-pick", "box-add", "box-clear"} <= set(events)
        ok, answer = call(rev, events["review-next"], [None])   # control: a reviewer gets a film
        assert ok and "data:image/png;base64," in answer and any(i in answer for i in ids)
        ok, answer = call(rev, events["load"], [])
        assert ok and "data:image/png;base64," in answer
    before = len(records(viewer))
    with session(viewer, USER, PASSWORD) as c:
        events = review_events(c)
        ok, answer = call(c, events["load"], [])     # the page load: the tab stays hidden, no film
        assert ok and "data:image" not in answer and not any(i in answer for i in ids)
        assert '"visible": false' in answer.replace("'", '"')
        state = {"image_id": ids[0], "label": "Pneumonia", "boxes": [], "corner": None}
        attempts = {
            "review-next": [state], "review-prev": [state], "review-next-unreviewed": [state],
            "review-save": [state, "agree", "finding"], "review-label": [None, state],
            "box-add": [state, 1, 1, 4, 4, "evidence", "marker"], "box-clear": [state], "review-pick": [state],
        }
        for name, data in attempts.items():
            event_data = {"index": [3, 4], "value": None} if name == "review-pick" else None
            ok, answer = call(c, events[name], data, event_data)
            assert not ok, (name, answer[:300])
            assert "reviewer role" in answer and "data:image" not in answer, (name, answer[:300])
            assert not any(i in answer for i in ids if i != ids[0]), name
    assert len(records(viewer)) == before
    assert "reviewer role" in viewer.log.read_text()
