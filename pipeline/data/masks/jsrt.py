"""JSRT images with SCR masks: lungs *and* heart.

Images: JSRT's raw `JPCLN001.IMG` (2048 x 2048, 12-bit, big-endian, larger = darker) or a PNG/JPEG
conversion with the same stem, anywhere under the root. Masks: SCR's `masks/heart/`, `masks/left lung/`
and `masks/right lung/` GIFs (`fold1/`, `fold2/` or flat), matched by stem.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import DataParams
from pipeline.data.decode import DecodeError, decode
from pipeline.data.masks.common import MaskRecord, fit_native, fit_pair
from pipeline.data.record import Quarantined

RAW_SIDE = 2048


def read_raw(path: Path) -> np.ndarray:
    """A JSRT .IMG file as float [0, 1], 0 = black."""
    raw = np.fromfile(path, dtype=">u2")
    if raw.size != RAW_SIDE * RAW_SIDE:
        raise DecodeError(f"JSRT raw image has {raw.size} pixels, expected {RAW_SIDE}x{RAW_SIDE}")
    return 1.0 - np.clip(raw.reshape(RAW_SIDE, RAW_SIDE).astype(np.float32), 0, 4095) / 4095.0


def _masks(root: Path, structure: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted(root.rglob(f"masks/{structure}/*.gif"))}


def _read_masks(left: Path, right: Path, heart: Path) -> tuple[np.ndarray, np.ndarray]:
    return (decode(left).pixels > 0.5) | (decode(right).pixels > 0.5), decode(heart).pixels > 0.5


def native_masks(left: Path, right: Path, heart: Path, image_shape: tuple[int, int], p: DataParams) -> np.ndarray:
    """The SCR masks at their own side (1024), fitted like the image (MaskRecord.native)."""
    return fit_native(image_shape, *_read_masks(left, right, heart), p)


def mask_records(root: str | Path, p: DataParams) -> Iterator[MaskRecord | Quarantined]:
    root = Path(root)
    heart, left, right = (_masks(root, s) for s in ("heart", "left lung", "right lung"))
    if not heart:
        raise ValueError(f"{root}: no SCR masks (masks/heart/*.gif)")
    images = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in (".img", ".png", ".jpg", ".jpeg") and path.stem in heart and "masks" not in path.parts:
            images.setdefault(path.stem, path)
    for stem, path in sorted(images.items()):
        rel = str(path.relative_to(root))
        if stem not in left or stem not in right:
            continue
        try:
            image = read_raw(path) if path.suffix.lower() == ".img" else decode(path, max_pixels=p.max_pixels).pixels
            lungs, heart_mask = _read_masks(left[stem], right[stem], heart[stem])
        except DecodeError as err:
            yield Quarantined(rel, str(err))
            continue
        img, bits = fit_pair(image, lungs, heart_mask, p)
        native = partial(native_masks, left[stem], right[stem], heart[stem], image.shape, p)
        yield MaskRecord(img, bits, ("lungs", "heart"), f"jsrt:{stem}", rel, native)
