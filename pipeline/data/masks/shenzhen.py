"""Shenzhen set (NLM) with the public lung masks: `CXR_png/CHNCXR_0001_0.png` and
`mask/CHNCXR_0001_0_mask.png` (`masks/` in some copies). Lungs only; images without a mask are skipped."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import DataParams
from pipeline.data.decode import DecodeError, decode
from pipeline.data.masks.common import MaskRecord, find_root, fit_native, fit_pair
from pipeline.data.record import Quarantined


def native_masks(mask: Path, image_shape: tuple[int, int], p: DataParams) -> np.ndarray:
    return fit_native(image_shape, decode(mask, max_pixels=p.max_pixels).pixels > 0.5, None, p)


def mask_records(root: str | Path, p: DataParams) -> Iterator[MaskRecord | Quarantined]:
    base = find_root(Path(root), "CXR_png")
    mask_dirs = [d for d in (base / "mask", base / "masks") if d.is_dir()]
    if not mask_dirs:
        raise ValueError(f"{base}: no mask/ or masks/ folder")
    for path in sorted((base / "CXR_png").glob("*.png")):
        rel = str(path.relative_to(base))
        mask = next((m for d in mask_dirs for m in (d / f"{path.stem}_mask.png", d / path.name) if m.is_file()), None)
        if mask is None:
            continue
        try:
            image = decode(path, max_pixels=p.max_pixels).pixels
            lungs = decode(mask, max_pixels=p.max_pixels).pixels > 0.5
        except DecodeError as err:
            yield Quarantined(rel, str(err))
            continue
        img, bits = fit_pair(image, lungs, None, p)
        yield MaskRecord(img, bits, ("lungs",), f"shenzhen:{path.stem}", rel, partial(native_masks, mask, image.shape, p))
