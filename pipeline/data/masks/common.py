"""The mask-record contract and the helpers the mask datasets share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    # the same masks fitted the same way at their own resolution (native_side), read again on demand:
    # Dice is measured there, not at the U-Net's input size; None = `anatomy` is already native
    native: Callable[[], np.ndarray] | None = None


NATIVE_MAX = 2048  # a larger mask is scored at this side (its outline is smooth: Dice changes < 1e-3)


def native_side(mask_shape: tuple[int, ...]) -> int:
    return int(min(max(mask_shape), NATIVE_MAX))


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
    return img, fit_masks(image.shape, lungs, heart, p)


def fit_masks(image_shape: tuple[int, int], lungs: np.ndarray, heart: np.ndarray | None, p: DataParams
              ) -> np.ndarray:
    """Bits (p.image_size square) of masks laid over an image of `image_shape`, fitted like the image."""
    bits = np.zeros((p.image_size, p.image_size), np.uint8)
    for mask, bit in ((lungs, LUNGS_BIT), (heart, HEART_BIT)):
        if mask is None:
            continue
        resized = cv2.resize(mask.astype(np.float32), (image_shape[1], image_shape[0]), interpolation=cv2.INTER_LINEAR)
        fitted, _ = fit_square(resized, p)
        bits |= (fitted > 127).astype(np.uint8) * bit
    return bits


def fit_native(image_shape: tuple[int, int], lungs: np.ndarray, heart: np.ndarray | None, p: DataParams
               ) -> np.ndarray:
    """`fit_masks` at the masks' own side (the fit, trim and crop of `p`, not its image_size)."""
    return fit_masks(image_shape, lungs, heart, p.model_copy(update={"image_size": native_side(lungs.shape)}))


