"""The mask-record contract and the helpers the mask datasets share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import DataParams
from pipeline.data.record import HEART_BIT, LUNGS_BIT
from pipeline.data.sources.common import fit_square


@dataclass
class MaskRecord:
    image: np.ndarray           # uint8 (S, S), fitted like every prepared image
    anatomy: np.ndarray         # uint8 (S, S) bit mask: LUNGS_BIT | HEART_BIT
    known: tuple[str, ...]      # structures this dataset annotates ("lungs",) or ("lungs", "heart")
    patient_id: str             # for a patient-level held-out split
    source_path: str


def find_root(root: Path, marker: str) -> Path:
    """The folder holding `marker` (e.g. CXR_png): `root` itself or the one folder below it that has it."""
    if (root / marker).exists():
        return root
    hits = sorted(p.parent for p in root.glob(f"*/{marker}"))
    if not hits:
        raise ValueError(f"{root}: no {marker!r} folder here or one level down")
    return hits[0]


def fit_pair(image: np.ndarray, lungs: np.ndarray, heart: np.ndarray | None, p: DataParams
             ) -> tuple[np.ndarray, np.ndarray]:
    """An image (float [0, 1], original size) and its masks (bool, any size) -> prepared image and bits."""
    img, _ = fit_square(image, p)
    bits = np.zeros(img.shape, np.uint8)
    for mask, bit in ((lungs, LUNGS_BIT), (heart, HEART_BIT)):
        if mask is None:
            continue
        resized = cv2.resize(mask.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        fitted, _ = fit_square(resized, p)
        bits |= (fitted > 127).astype(np.uint8) * bit
    return img, bits


