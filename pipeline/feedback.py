"""Clinician feedback: reviewers' marks on the run's val/test films, kept as append-only JSONL.

One record per mark, one line per record, in `Paths.feedback_log` (data/feedback/marks.jsonl):

    {"v": 1, "id": "<uuid4 hex>", "type": "mark", "image_id": "P00012_0", "label": "Pneumonia",
     "call": "agree" | "disagree", "heatmap": "finding" | "shortcut" | "elsewhere",
     "boxes": [{"x": 3, "y": 4, "w": 10, "h": 8, "kind": "evidence" | "shortcut",
                "what": "marker" | "text" | "tube" | "edge" | "other" | null}],
     "image_size": 128, "reviewer": "alice", "time": "2025-01-01T12:00:00.000000Z",
     "model_sha256": "...", "model_cycle": 2}

`image_id` is the manifest's pseudonymous id (never a file name or anything from the film's
header); boxes are in prepared-image pixels (`image_size` a side), `what` only on shortcut boxes.
Nothing is ever edited: a retraction is a later record `{"type": "retraction", "retracts": "<id>"}`
by the reviewer who made the mark. The effective marks (`load_feedback`) are, per (image, label,
reviewer), the latest mark in file order that no retraction names.

Why one file and a lock rather than one file per record: every writer opens the file with
O_APPEND, takes an exclusive `fcntl.flock` on its own descriptor (so threads of one process exclude
each other as processes do), writes its complete lines in one `write`, and `fsync`s before the lock
is released. Appends are therefore serialised, each batch lands whole and in one place, file order
is the order of acceptance (the order "latest" means, whatever the reviewers' clocks say), and DVC
tracks one small file. A writer killed mid-write can leave a torn last line: the next writer ends it
with a newline before appending, and readers skip a line that is not a complete JSON record (and
the final line until its newline is written). The lock is local-filesystem only (not NFS).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Paths

log = logging.getLogger(__name__)

SCHEMA = 1
CALLS = ("agree", "disagree")
HEATMAP_VERDICTS = ("finding", "shortcut", "elsewhere")
BOX_KINDS = ("evidence", "shortcut")
SHORTCUT_WHATS = ("marker", "text", "tube", "edge", "other")
REVIEW_SPLITS = ("val", "test")
MAX_BOXES = 20                 # per mark
MAX_ITEMS = 500                # marks and retractions in one append
MARK_FIELDS = {"image_id", "label", "call", "heatmap", "boxes"}
BOX_FIELDS = {"x", "y", "w", "h", "kind", "what"}
COLUMNS = ["id", "image_id", "label", "reviewer", "call", "heatmap", "boxes", "time", "model_sha256",
           "model_cycle", "image_size"]


class FeedbackError(ValueError):
    """A mark or retraction that cannot be stored; the message is one line, safe to show."""


class NotYours(FeedbackError):
    """A retraction naming another reviewer's mark."""


@dataclass(frozen=True)
class ReviewScope:
    """What a mark may name: the run's val/test films, the served model's labels, and the side of the
    prepared images the boxes are drawn on (pipeline/viewer/review.py builds it from the run)."""
    image_ids: tuple[str, ...]
    labels: tuple[str, ...]
    image_size: int

    @cached_property
    def known(self) -> frozenset[str]:
        return frozenset(self.image_ids)


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise FeedbackError(f"{name} must be a non-empty string")
    return value


def _choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise FeedbackError(f"{name} must be one of {', '.join(allowed)}")
    return value


def _pixel(value, name: str) -> int:
    """An integer (an integral float is accepted: JSON numbers and UI number fields)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FeedbackError(f"{name} must be an integer number of pixels")
    if isinstance(value, float) and not (np.isfinite(value) and value.is_integer()):
        raise FeedbackError(f"{name} must be an integer number of pixels")
    return int(value)


def validate_box(raw, size: int, where: str = "box") -> dict:
    """A box inside a `size` x `size` image with positive width and height."""
    if not isinstance(raw, dict):
        raise FeedbackError(f"{where} must be an object with x, y, w, h, kind")
    extra = set(raw) - BOX_FIELDS
    if extra:
        raise FeedbackError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}")
    x, y, w, h = (_pixel(raw.get(k), f"{where}.{k}") for k in ("x", "y", "w", "h"))
    if w <= 0 or h <= 0:
        raise FeedbackError(f"{where}: width and height must be positive")
    if x < 0 or y < 0 or x + w > size or y + h > size:
        raise FeedbackError(f"{where}: ({x}, {y}, {w}, {h}) is not inside the {size}x{size} image")
    kind = _choice(raw.get("kind"), f"{where}.kind", BOX_KINDS)
    what = raw.get("what")
    if kind == "shortcut":
        what = _choice(what, f"{where}.what", SHORTCUT_WHATS)
    elif what is not None:
        raise FeedbackError(f"{where}: 'what' names a shortcut; an evidence box has none")
    return {"x": x, "y": y, "w": w, "h": h, "kind": kind, "what": what}


def validate_mark(raw, scope: ReviewScope, where: str = "mark") -> dict:
    """The mark's fields, checked against `scope`; FeedbackError names the first problem."""
    if not isinstance(raw, dict):
        raise FeedbackError(f"{where} must be an object with image_id, label, call, heatmap (and boxes)")
    extra = set(raw) - MARK_FIELDS
    if extra:
        raise FeedbackError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}")
    image_id = _text(raw.get("image_id"), f"{where}.image_id")
    if image_id not in scope.known:
        raise FeedbackError(f"{where}.image_id: no film {image_id[:64]!r} in this run's val/test split")
    label = raw.get("label")
    if not isinstance(label, str) or label not in scope.labels:
        raise FeedbackError(f"{where}.label must be one of the model's labels: {', '.join(scope.labels)}")
    boxes = raw.get("boxes", [])
    if boxes is None:
        boxes = []
    if not isinstance(boxes, list):
        raise FeedbackError(f"{where}.boxes must be a list")
    if len(boxes) > MAX_BOXES:
        raise FeedbackError(f"{where}.boxes: at most {MAX_BOXES} boxes per mark")
    return {"image_id": image_id, "label": label,
            "call": _choice(raw.get("call"), f"{where}.call", CALLS),
            "heatmap": _choice(raw.get("heatmap"), f"{where}.heatmap", HEATMAP_VERDICTS),
            "boxes": [validate_box(b, scope.image_size, f"{where}.boxes[{k}]") for k, b in enumerate(boxes)]}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- writing -----------------------------------------------------------------------------------------

def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _parse(data: bytes) -> list[dict]:
    """The complete records of the log's bytes, in file order (torn or unfinished lines skipped)."""
    lines = data.split(b"\n")
    out, bad = [], 0
    for line in lines[:-1]:   # the part after the last newline is unfinished: never a record yet
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(record, dict) and record.get("type") in ("mark", "retraction") and "id" in record:
            out.append(record)
        else:
            bad += 1
    if bad:
        log.warning("feedback: %d line(s) of the log are not complete records (a writer killed mid-line?); skipped",
                    bad)
    return out


def append(paths: Paths, marks: list[dict], *, reviewer: str, model_sha256: str | None,
           model_cycle: int | None, scope: ReviewScope, retract: list[str] = ()) -> list[dict]:
    """Validate `marks` and `retract` (ids of this reviewer's own marks), then append them all at once.

    Returns the records written. Nothing is written unless every item is valid."""
    reviewer = _text(reviewer, "reviewer")
    if not isinstance(marks, list) or not isinstance(retract, (list, tuple)):
        raise FeedbackError("marks and retractions must be lists")
    if not marks and not retract:
        raise FeedbackError("nothing to save: no marks and no retractions")
    if len(marks) + len(retract) > MAX_ITEMS:
        raise FeedbackError(f"at most {MAX_ITEMS} marks and retractions at once")
    checked = [validate_mark(m, scope, f"marks[{k}]") for k, m in enumerate(marks)]
    wanted = [_text(r, f"retract[{k}]") for k, r in enumerate(retract)]
    now = _now()
    records = [{"v": SCHEMA, "id": uuid.uuid4().hex, "type": "mark", **m, "image_size": scope.image_size,
                "reviewer": reviewer, "time": now, "model_sha256": model_sha256, "model_cycle": model_cycle}
               for m in checked]
    records += [{"v": SCHEMA, "id": uuid.uuid4().hex, "type": "retraction", "retracts": r, "reviewer": reviewer,
                 "time": now} for r in wanted]
    data = b"".join(json.dumps(r, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n" for r in records)

    def check(existing: list[dict]) -> None:
        owner = {r["id"]: r.get("reviewer") for r in existing if r.get("type") == "mark"}
        for r in wanted:
            if r not in owner:
                raise FeedbackError(f"retract: no mark with id {r[:64]!r}")
            if owner[r] != reviewer:
                raise NotYours(f"retract: mark {r[:64]!r} is another reviewer's")

    _append_bytes(paths.feedback_log, data, check if wanted else None)
    return records


def _append_bytes(path: Path, data: bytes, check=None) -> None:
    """Append complete lines under an exclusive lock, durably; `check(records)` runs under the lock first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if check is not None:
            check(_parse(_read_all(fd)))
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data   # end a torn line a killed writer left, so this batch starts a line
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)   # releases the lock
    if created:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- reading -----------------------------------------------------------------------------------------

def read_records(paths: Paths) -> list[dict]:
    """Every complete record of the log, marks and retractions, in the order they were accepted."""
    path = paths.feedback_log
    if not path.is_file():
        return []
    return _parse(path.read_bytes())


def effective(records: list[dict]) -> pd.DataFrame:
    """The marks in force: per (image, label, reviewer), the latest mark no retraction withdraws."""
    withdrawn = {(r.get("retracts"), r.get("reviewer")) for r in records if r.get("type") == "retraction"}
    latest: dict[tuple, dict] = {}
    for r in records:
        if r.get("type") == "mark" and (r["id"], r.get("reviewer")) not in withdrawn:
            latest[(r.get("image_id"), r.get("label"), r.get("reviewer"))] = r   # file order: later wins
    rows = [{c: r.get(c) for c in COLUMNS} for r in latest.values()]
    return pd.DataFrame(rows, columns=COLUMNS)


def load_feedback(paths: Paths) -> pd.DataFrame:
    """The effective marks of a project (columns: COLUMNS; `boxes` holds lists of box dicts)."""
    return effective(read_records(paths))


def _boxes(marks: pd.DataFrame, kind: str, by_label: bool) -> dict:
    out: dict = {}
    for image_id, label, boxes, side in zip(marks["image_id"], marks["label"], marks["boxes"], marks["image_size"]):
        key = (image_id, label) if by_label else image_id
        for box in boxes or []:
            box = {**box, "image_size": int(side)}
            if box["kind"] == kind and box not in out.setdefault(key, []):
                out[key].append(box)
    return {k: v for k, v in out.items() if v}


def shortcut_boxes(marks: pd.DataFrame) -> dict[str, list[dict]]:
    """image_id -> every shortcut box any reviewer drew on it (whatever the label): regions to decorrelate.
    Each box carries the `image_size` it was drawn on (`boxes_mask` rescales)."""
    return _boxes(marks, "shortcut", by_label=False)


def evidence_boxes(marks: pd.DataFrame) -> dict[tuple[str, str], list[dict]]:
    """(image_id, label) -> every evidence box reviewers drew for that label: localisation ground truth."""
    return _boxes(marks, "evidence", by_label=True)


def boxes_mask(boxes: list[dict], size: int) -> np.ndarray:
    """Bool (size, size) mask covering `boxes`, each scaled from the `image_size` it was drawn on
    (default: `size`) outwards to whole pixels."""
    mask = np.zeros((size, size), bool)
    for b in boxes:
        scale = size / float(b.get("image_size") or size)
        x0, y0 = int(np.floor(b["x"] * scale)), int(np.floor(b["y"] * scale))
        x1, y1 = int(np.ceil((b["x"] + b["w"]) * scale)), int(np.ceil((b["y"] + b["h"]) * scale))
        mask[max(0, y0):min(size, y1), max(0, x0):min(size, x1)] = True
    return mask


def shortcut_region(paths: Paths, size: int) -> tuple[np.ndarray | None, int]:
    """(mask, number of boxes): every shortcut box in force, from any film, as one (size, size) region,
    or None when reviewers marked none. The enhancement decorrelates it on every training film and
    `train.rrr_weight` penalises the input gradient inside it (the same region for every image, as the
    enhancement's own regions are: docs/enhancement.md, rule 1)."""
    boxes = [b for bs in shortcut_boxes(load_feedback(paths)).values() for b in bs]
    return (boxes_mask(boxes, size), len(boxes)) if boxes else (None, 0)
