"""The embedded default dataset: phantom radiographs with a planted, label-agreeing shortcut.

Each shortcut label has its own marker outside the body. In train/val/test the marker is drawn
exactly when the finding is present with probability `shortcut_p` (it agrees with the label); in
`test_shifted` the agreement is flipped (probability 1 - p), so a model that reads the marker scores
well on `test` and badly on `test_shifted`.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from pipeline.config import Params
from pipeline.data import phantom
from pipeline.data.manifest import patient_split
from pipeline.data.record import Pending, Record, encode_anatomy

log = logging.getLogger(__name__)

LABELS = list(phantom.PHANTOM_LABELS)


def marker_agrees(rng: np.random.Generator, split: str, p: float) -> bool:
    """Whether a shortcut marker agrees with its label: with probability p, flipped in test_shifted."""
    agree = rng.random() < p
    return (not agree) if split == "test_shifted" else agree


def records(params: Params, salt: str = "") -> Iterator[Pending]:
    """One Pending per patient; phantom images need no decoding and have no real identifiers (`salt` is unused)."""
    ph, seed = params.phantom, params.data.seed
    unknown = set(ph.shortcut_labels) - set(phantom.SHORTCUT_MARKERS)
    if unknown:
        raise ValueError(f"phantom.shortcut_labels: no marker for {sorted(unknown)}; "
                         f"markers exist for {sorted(phantom.SHORTCUT_MARKERS)}")
    patients = [f"P{k:05d}" for k in range(ph.n_patients)]
    split_of = patient_split(patients, params.data.split.model_dump(), seed)
    for k, pid in enumerate(patients):
        yield Pending(patient_records, (params, k, pid, split_of[pid]))


def patient_records(params: Params, k: int, pid: str, split: str) -> list[Record]:
    """Every film of phantom patient `k`, from its own RNG stream (so patients render anywhere, in any order)."""
    ph, size, seed = params.phantom, params.data.image_size, params.data.seed
    rng = np.random.default_rng([seed, k])
    anatomy = phantom.sample_patient(rng)
    out = []
    for j in range(1 + int(rng.integers(ph.max_images_per_patient))):
        findings = {lab: bool(rng.random() < ph.prevalence.get(lab, 0.0)) for lab in LABELS}
        markers = {lab: (findings[lab] if marker_agrees(rng, split, ph.shortcut_p) else not findings[lab])
                   if lab in ph.shortcut_labels else False
                   for lab in phantom.SHORTCUT_MARKERS}
        img = phantom.render(rng, size, anatomy, findings, markers, opacity_contrast=ph.opacity_contrast)
        out.append(Record(
            image=img.image, image_id=f"{pid}_{j}", patient_id=pid, split=split,
            source_path=f"phantom://{seed}/{pid}/{j}", view="PA",
            labels={lab: float(v) for lab, v in findings.items()},
            boxes=list(img.boxes), anatomy=encode_anatomy(img.lungs, img.heart),
            meta={"age_years": anatomy.age_years, "sex": anatomy.sex, "ctr": round(img.ctr, 4),
                  **{f"marker_{lab}": int(v) for lab, v in img.markers.items()}},
        ))
    return out
