"""What the review mode works on: the run's val/test films, straight from its own store, and each
reviewer's progress through them.

Films come from the store the cycle scores on (`Paths.images`: the prepared films, or the audit's
copies with the marker when the shortcut audit is on), in manifest order, named by the manifest's
pseudonymous `image_id`; never from an upload. Every reviewer goes through them in the same order, so
reviewers overlap on the first films (what inter-reviewer agreement needs). A film counts as reviewed
by a reviewer once they have a mark in force for every label of the served model. The manifest and
store are re-read when the run rewrites them.
"""
from __future__ import annotations

import logging
import threading

import numpy as np
import pandas as pd

from pipeline import feedback
from pipeline.config import Paths
from pipeline.data.store import INDEX, ArrayStore
from pipeline.viewer.inference import Analysis, ServedModels

log = logging.getLogger(__name__)


class NoFilms(RuntimeError):
    """The run has no prepared val/test films to review (yet)."""


class ReviewFilms:
    def __init__(self, models: ServedModels):
        self.models = models
        audit = bool(getattr(getattr(models.params, "audit", None), "enabled", False))
        self.paths = Paths(models.root, audit=audit)
        self._lock = threading.Lock()
        self._stamp = None
        self._frame: pd.DataFrame | None = None       # image_id, split, row (store index) of val/test films
        self._store: ArrayStore | None = None

    def _current_stamp(self):
        try:
            return tuple((p.stat().st_mtime_ns, p.stat().st_size)
                         for p in (self.paths.manifest, self.paths.images / INDEX))
        except OSError:
            return None

    def _load(self) -> tuple[pd.DataFrame, ArrayStore]:
        stamp = self._current_stamp()
        with self._lock:
            if stamp is None:
                raise NoFilms("no prepared films to review: run the pipeline first (`make run` or `dvc repro`)")
            if stamp != self._stamp:
                frame = pd.read_parquet(self.paths.manifest, columns=["image_id", "split"])
                frame["row"] = np.arange(len(frame))
                frame = frame[frame["split"].isin(feedback.REVIEW_SPLITS)].reset_index(drop=True)
                frame["image_id"] = frame["image_id"].astype(str)
                self._frame, self._store, self._stamp = frame, ArrayStore(self.paths.images), stamp
            return self._frame, self._store

    def scope(self) -> feedback.ReviewScope:
        """What a mark may name now (the served model's labels: call models.load() first)."""
        frame, store = self._load()
        return feedback.ReviewScope(tuple(frame["image_id"]), tuple(self.models.latest.meta["labels"]),
                                    int(store.item_shape[-1]))

    def ids(self) -> list[str]:
        return list(self._load()[0]["image_id"])

    def info(self, image_id: str) -> dict:
        """Position (1-based), split and store row of a film; KeyError when it is not a val/test film."""
        frame, _ = self._load()
        hit = np.flatnonzero(frame["image_id"].to_numpy() == image_id)
        if not len(hit):
            raise KeyError(image_id)
        k = int(hit[0])
        return {"image_id": image_id, "split": str(frame.at[k, "split"]), "position": k + 1,
                "total": len(frame), "row": int(frame.at[k, "row"])}

    def image(self, image_id: str) -> np.ndarray:
        row = self.info(image_id)["row"]
        _, store = self._load()
        with self._lock:
            return np.asarray(store[row], np.uint8)

    def analyse(self, image_id: str) -> Analysis:
        img = self.image(image_id)
        return self.models.analyse_image(img, {"format": "prepared", "view": None, "width": int(img.shape[1]),
                                               "height": int(img.shape[0])})

    # -- marks and progress -------------------------------------------------------------------------
    def marks(self, reviewer: str, image_id: str | None = None) -> pd.DataFrame:
        """This reviewer's marks in force (on one film, or all)."""
        marks = feedback.load_feedback(self.paths)
        marks = marks[marks["reviewer"] == reviewer]
        return marks if image_id is None else marks[marks["image_id"] == image_id]

    def reviewed(self, reviewer: str, labels) -> set[str]:
        """The films on which `reviewer` has a mark in force for every one of `labels`."""
        marks = self.marks(reviewer)
        need = set(labels)
        return {iid for iid, grp in marks.groupby("image_id") if need <= set(grp["label"])}

    def progress(self, reviewer: str) -> tuple[int, int]:
        """(films reviewed, films to review)."""
        scope = self.scope()
        return len(self.reviewed(reviewer, scope.labels) & scope.known), len(scope.image_ids)

    def next_unreviewed(self, reviewer: str, after: str | None = None) -> str | None:
        """The first film after `after` (from the start without it; wrapping round) that `reviewer` has
        not finished; None when every film is reviewed."""
        scope = self.scope()
        done = self.reviewed(reviewer, scope.labels)
        ids = list(scope.image_ids)
        start = ids.index(after) + 1 if after in scope.known else 0
        for iid in ids[start:] + ids[:start]:
            if iid not in done:
                return iid
        return None

    def save(self, reviewer: str, marks: list[dict], retract: list[str] = ()) -> list[dict]:
        """Validate and append `reviewer`'s marks (and retractions), stamped with the served model."""
        self.models.load()
        served = self.models.latest
        return feedback.append(self.paths, marks, reviewer=reviewer, model_sha256=served.sha256,
                               model_cycle=served.cycle, scope=self.scope(), retract=list(retract))
