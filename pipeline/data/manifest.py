"""The manifest contract: one row per image, labels 1/0/NaN, splits by patient.

Row order is the order of every array store (images, masks, CAMs): row i of the manifest is item i
of each store.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from pipeline.data.labels import CANONICAL_LABELS

SPLITS = ("train", "val", "test", "test_shifted")
REQUIRED_COLUMNS = ("image_id", "patient_id", "split", "source_path", "view")
BOX_COLUMNS = ("image_id", "label", "x", "y", "w", "h")


class ManifestError(ValueError):
    pass


def patient_split(patient_ids, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign each patient to one split; deterministic for (patients, fractions, seed).

    Patients are ordered by a salted hash, so adding patients does not reshuffle existing ones
    much, and no patient can land in two splits.
    """
    unique = sorted(set(map(str, patient_ids)))
    keyed = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = len(keyed)
    out: dict[str, str] = {}
    start = 0
    for split in ("val", "test", "test_shifted"):
        count = int(round(fractions.get(split, 0.0) * n))
        for p in keyed[start:start + count]:
            out[p] = split
        start += count
    for p in keyed[start:]:
        out[p] = "train"
    return out


def validate_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Raise ManifestError if the frame breaks the contract; return it unchanged otherwise."""
    missing = [c for c in (*REQUIRED_COLUMNS, *CANONICAL_LABELS) if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest lacks columns: {missing}")
    if df["image_id"].duplicated().any():
        raise ManifestError("manifest has duplicate image_id values")
    bad_split = set(df["split"]) - set(SPLITS)
    if bad_split:
        raise ManifestError(f"manifest has unknown splits {sorted(bad_split)}")
    per_patient = df.groupby("patient_id")["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        raise ManifestError(f"{len(leaked)} patients appear in more than one split, e.g. {leaked.index[0]!r}")
    for label in CANONICAL_LABELS:
        values = df[label].dropna().unique()
        if not set(values.tolist()) <= {0.0, 1.0}:
            raise ManifestError(f"label column {label!r} holds values other than 1/0/NaN: {sorted(values)[:5]}")
    return df


def label_matrix(df: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """(N, L) float32 with 1/0/NaN for the given labels, in manifest order."""
    return df[list(labels)].to_numpy(dtype=np.float32)


def provided_labels(df: pd.DataFrame) -> list[str]:
    """Canonical labels with at least one known value, in canonical order."""
    return [label for label in CANONICAL_LABELS if df[label].notna().any()]


def rows(df: pd.DataFrame, split: str) -> np.ndarray:
    """Store indices (manifest row positions) of one split."""
    return np.flatnonzero(df["split"].to_numpy() == split)


def resolve_labels(requested: list[str] | None, df: pd.DataFrame) -> list[str]:
    """The model's labels: `data.labels` if set (each must be provided by the source), else all provided."""
    available = provided_labels(df)
    if not requested:
        return available
    missing = [label for label in requested if label not in available]
    if missing:
        raise ValueError(f"data.labels: {missing} not provided by this dataset; available: {available}")
    return list(requested)
