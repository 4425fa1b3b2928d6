"""The clinician feedback store (pipeline/feedback.py): validation, append-only records, retractions,
the effective marks, the helpers the cycle reads, and nothing lost or torn under concurrent writers."""
from __future__ import annotations

import json
import multiprocessing
import threading
import traceback
from pathlib import Path

import numpy as np
import pytest

from pipeline import feedback
from pipeline.config import Paths
from pipeline.feedback import FeedbackError, NotYours, ReviewScope

SCOPE = ReviewScope(image_ids=tuple(f"P{k:05d}_0" for k in range(40)), labels=("Pneumonia", "Cardiomegaly"),
                    image_size=64)


def mark(image="P00001_0", label="Pneumonia", call="agree", heatmap="finding", boxes=None) -> dict:
    out = {"image_id": image, "label": label, "call": call, "heatmap": heatmap}
    if boxes is not None:
        out["boxes"] = boxes
    return out


def save(paths, marks, reviewer="ann", retract=()):
    return feedback.append(paths, marks, reviewer=reviewer, model_sha256="ab" * 32, model_cycle=2, scope=SCOPE,
                           retract=list(retract))


def test_feedback_lives_under_data_feedback(tmp_path):
    paths = Paths(tmp_path)
    assert paths.feedback == tmp_path / "data" / "feedback"
    assert paths.feedback_log.parent == paths.feedback and paths.feedback_log.suffix == ".jsonl"


def test_a_mark_is_one_complete_record_with_who_when_and_which_model(tmp_path):
    paths = Paths(tmp_path)
    box = {"x": 2, "y": 3, "w": 10, "h": 6, "kind": "shortcut", "what": "marker"}
    (rec,) = save(paths, [mark(boxes=[box])])
    lines = paths.feedback_log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == rec
    assert rec["type"] == "mark" and rec["image_id"] == "P00001_0" and rec["reviewer"] == "ann"
    assert rec["model_sha256"] == "ab" * 32 and rec["model_cycle"] == 2 and rec["image_size"] == 64
    assert rec["time"].endswith("Z") and len(rec["id"]) == 32
    assert rec["boxes"] == [box]
    # no file name, path or patient field can ride along: unknown fields are refused
    with pytest.raises(FeedbackError, match="unknown field"):
        save(paths, [{**mark(), "file_name": "ZEBEDEE_MARGARETHE.dcm"}])


@pytest.mark.parametrize("bad,message", [
    (mark(label="Edema"), "label must be one of"),
    (mark(label=3), "label must be one of"),
    (mark(call="maybe"), "call must be one of"),
    (mark(heatmap="lungs"), "heatmap must be one of"),
    (mark(heatmap=None), "heatmap must be one of"),
    (mark(image="P99999_0"), "no film"),
    (mark(image=""), "non-empty string"),
    (mark(image=["P00001_0"]), "non-empty string"),
    (mark(boxes={"x": 1}), "must be a list"),
    (mark(boxes=[{"x": 60, "y": 0, "w": 5, "h": 5, "kind": "evidence"}]), "not inside the 64x64 image"),
    (mark(boxes=[{"x": -1, "y": 0, "w": 5, "h": 5, "kind": "evidence"}]), "not inside"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 0, "h": 5, "kind": "evidence"}]), "must be positive"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 4, "h": -2, "kind": "evidence"}]), "must be positive"),
    (mark(boxes=[{"x": 0.5, "y": 0, "w": 4, "h": 2, "kind": "evidence"}]), "integer number of pixels"),
    (mark(boxes=[{"x": True, "y": 0, "w": 4, "h": 2, "kind": "evidence"}]), "integer number of pixels"),
    (mark(boxes=[{"x": "1", "y": 0, "w": 4, "h": 2, "kind": "evidence"}]), "integer number of pixels"),
    (mark(boxes=[{"x": float("nan"), "y": 0, "w": 4, "h": 2, "kind": "evidence"}]), "integer number of pixels"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 4, "h": 2, "kind": "lesion"}]), "kind must be one of"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 4, "h": 2, "kind": "shortcut"}]), "what must be one of"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 4, "h": 2, "kind": "evidence", "what": "marker"}]), "an evidence box has none"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 4, "h": 2, "kind": "evidence", "colour": "red"}]), "unknown field"),
    (mark(boxes=[{"x": 0, "y": 0, "w": 1, "h": 1, "kind": "evidence"}] * 21), "at most 20 boxes"),
    ("not a mark", "must be an object"),
])
def test_invalid_marks_are_refused_with_a_clear_message_and_nothing_is_written(tmp_path, bad, message):
    paths = Paths(tmp_path)
    with pytest.raises(FeedbackError, match=message):
        save(paths, [mark(), bad])   # the valid first mark is not written either: all or nothing
    assert not paths.feedback_log.exists()


def test_a_box_may_touch_the_far_edge_and_integral_floats_are_pixels(tmp_path):
    (rec,) = save(Paths(tmp_path), [mark(boxes=[{"x": 54.0, "y": 0, "w": 10, "h": 64, "kind": "evidence"}])])
    assert rec["boxes"] == [{"x": 54, "y": 0, "w": 10, "h": 64, "kind": "evidence", "what": None}]


def test_empty_and_oversized_appends_are_refused(tmp_path):
    with pytest.raises(FeedbackError, match="nothing to save"):
        save(Paths(tmp_path), [])
    with pytest.raises(FeedbackError, match="at most 500"):
        save(Paths(tmp_path), [mark()] * 501)
    with pytest.raises(FeedbackError, match="must be lists"):
        save(Paths(tmp_path), mark())


def test_latest_mark_per_image_label_reviewer_wins_and_retractions_withdraw(tmp_path):
    paths = Paths(tmp_path)
    first = save(paths, [mark(call="agree"), mark(label="Cardiomegaly")])
    second = save(paths, [mark(call="disagree", heatmap="shortcut")])
    save(paths, [mark(call="agree")], reviewer="bob")
    df = feedback.load_feedback(paths)
    assert list(df.columns) == feedback.COLUMNS
    ann = df[(df.reviewer == "ann") & (df.label == "Pneumonia")]
    assert len(ann) == 1 and ann.iloc[0]["call"] == "disagree" and ann.iloc[0]["id"] == second[0]["id"]
    assert len(df) == 3   # ann's two labels, bob's one
    # ann retracts her latest Pneumonia mark: her earlier one is in force again; the log only grew
    lines_before = paths.feedback_log.read_text().splitlines()
    (retraction,) = save(paths, [], retract=[second[0]["id"]])
    assert retraction["type"] == "retraction" and retraction["retracts"] == second[0]["id"]
    assert paths.feedback_log.read_text().splitlines()[:len(lines_before)] == lines_before
    ann = feedback.load_feedback(paths).query("reviewer == 'ann' and label == 'Pneumonia'")
    assert ann.iloc[0]["id"] == first[0]["id"]
    save(paths, [], retract=[first[0]["id"]])
    assert feedback.load_feedback(paths).query("reviewer == 'ann' and label == 'Pneumonia'").empty


def test_a_retraction_names_an_existing_mark_of_the_same_reviewer(tmp_path):
    paths = Paths(tmp_path)
    (rec,) = save(paths, [mark()])
    with pytest.raises(NotYours):
        save(paths, [], reviewer="bob", retract=[rec["id"]])
    with pytest.raises(FeedbackError, match="no mark with id"):
        save(paths, [], retract=["0" * 32])
    assert len(paths.feedback_log.read_text().splitlines()) == 1


def test_a_torn_last_line_is_skipped_and_the_next_append_starts_a_new_line(tmp_path):
    paths = Paths(tmp_path)
    save(paths, [mark()])
    with open(paths.feedback_log, "ab") as fh:          # a writer killed mid-line
        fh.write(b'{"v": 1, "id": "dead", "type": "mark", "image_')
    assert len(feedback.read_records(paths)) == 1       # the unfinished line is not a record
    save(paths, [mark(label="Cardiomegaly")])
    records = feedback.read_records(paths)
    assert [r["label"] for r in records] == ["Pneumonia", "Cardiomegaly"]
    assert len(paths.feedback_log.read_text().splitlines()) == 3   # the torn fragment sealed on its own line


def test_shortcut_and_evidence_boxes_and_their_masks(tmp_path):
    paths = Paths(tmp_path)
    marker = {"x": 0, "y": 0, "w": 4, "h": 4, "kind": "shortcut", "what": "marker"}
    lung = {"x": 10, "y": 20, "w": 8, "h": 6, "kind": "evidence"}
    save(paths, [mark(boxes=[marker, lung]), mark(label="Cardiomegaly", boxes=[marker])])
    save(paths, [mark(boxes=[marker])], reviewer="bob")
    df = feedback.load_feedback(paths)
    shortcuts = feedback.shortcut_boxes(df)
    assert list(shortcuts) == ["P00001_0"] and len(shortcuts["P00001_0"]) == 1   # the same box once
    assert shortcuts["P00001_0"][0]["image_size"] == 64
    evidence = feedback.evidence_boxes(df)
    assert list(evidence) == [("P00001_0", "Pneumonia")]
    mask = feedback.boxes_mask(evidence[("P00001_0", "Pneumonia")], 64)
    assert mask.sum() == 48 and mask[20:26, 10:18].all()
    big = feedback.boxes_mask(evidence[("P00001_0", "Pneumonia")], 128)   # the run now prepares 128 px films
    assert big.sum() == 4 * 48 and big[40:52, 20:36].all()
    assert feedback.shortcut_boxes(feedback.load_feedback(Paths(tmp_path / "none"))) == {}


def _writer(root: str, reviewer: str, n: int) -> None:
    """Append `n` marks; a failure leaves its traceback in ROOT/REVIEWER.error for the test to show."""
    paths = Paths(root)
    try:
        for k in range(n):
            save(paths, [mark(image=f"P{k % 40:05d}_0", label=("Pneumonia", "Cardiomegaly")[k % 2],
                              call=("agree", "disagree")[k % 2])], reviewer=reviewer)
    except BaseException:
        (Path(root) / f"{reviewer}.error").write_text(traceback.format_exc())
        raise


def test_eight_processes_appending_fifty_marks_each_lose_nothing_and_tear_no_line(tmp_path):
    # fresh interpreters, each with its own descriptors and locks: a fork of a pytest-xdist worker also
    # inherits what that worker ran, and a fork of one that had run a Prefect flow exits 1 at shutdown
    # (Prefect 3.8's at-exit drain; tests/test_training.py), as one forked writer here once did
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), f"rev{r}", 50)) for r in range(8)]
    for p in procs:
        p.start()
    for r, p in enumerate(procs):
        p.join(300)
        error = tmp_path / f"rev{r}.error"
        assert p.exitcode == 0, error.read_text() if error.exists() else f"writer {r} exit code {p.exitcode}"
    lines = Paths(tmp_path).feedback_log.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 401
    records = [json.loads(line) for line in lines[:-1]]   # every line parses: none torn or interleaved
    assert len({r["id"] for r in records}) == 400
    assert sorted({r["reviewer"] for r in records}) == [f"rev{r}" for r in range(8)]
    for r in range(8):
        assert sum(rec["reviewer"] == f"rev{r}" for rec in records) == 50
    # each reviewer marked 40 (film, label) pairs, ten of them twice: the latest of those is in force
    df = feedback.load_feedback(Paths(tmp_path))
    assert len(df) == 8 * 40
    by_id = {r["id"]: r for r in records}
    for _, row in df.iterrows():
        later = [r for r in records if (r["reviewer"], r["image_id"], r["label"]) ==
                 (row["reviewer"], row["image_id"], row["label"])]
        assert later[-1]["id"] == row["id"] and by_id[row["id"]]["call"] == row["call"]


def test_threads_of_one_process_exclude_each_other_too(tmp_path):
    errors = []

    def run(r):
        try:
            _writer(str(tmp_path), f"t{r}", 50)
        except Exception as err:   # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    records = feedback.read_records(Paths(tmp_path))
    assert len(records) == 400 and len({r["id"] for r in records}) == 400


def test_boxes_mask_scales_outwards_to_whole_pixels():
    mask = feedback.boxes_mask([{"x": 1, "y": 1, "w": 1, "h": 1, "image_size": 3}], 4)
    assert mask.sum() == 4 and mask[1:3, 1:3].all()
    assert np.array_equal(feedback.boxes_mask([], 8), np.zeros((8, 8), bool))
