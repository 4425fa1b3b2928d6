"""Montgomery County set (NLM): `CXR_png/MCUCXR_0001_0.png` with lung masks in
`ManualMask/leftMask/` and `ManualMask/rightMask/` (same file names). Lungs only."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import DataParams
from pipeline.data.decode import DecodeError, decode
from pipeline.data.masks.common import MaskRecord, find_root, fit_native, fit_pair
from pipeline.data.record import Quarantined


def _lungs(halves: list[Path], p: DataParams) -> np.ndarray:
    return sum(decode(h, max_pixels=p.max_pixels).pixels > 0.5 for h in halves) > 0


def native_masks(halves: list[Path], image_shape: tuple[int, int], p: DataParams) -> np.ndarray:
    return fit_native(image_shape, _lungs(halves, p), None, p)


def mask_records(root: str | Path, p: DataParams) -> Iterator[MaskRecord | Quarantined]:
    base = find_root(Path(root), "CXR_png")
    for path in sorted((base / "CXR_png").glob("*.png")):
        rel = str(path.relative_to(base))
        halves = [base / "ManualMask" / side / path.name for side in ("leftMask", "rightMask")]
        if not all(h.is_file() for h in halves):
            continue  # an image without its masks teaches nothing here
        try:
            image = decode(path, max_pixels=p.max_pixels).pixels
            lungs = _lungs(halves, p)
        except DecodeError as err:
            yield Quarantined(rel, str(err))
            continue
        img, bits = fit_pair(image, lungs, None, p)
        yield MaskRecord(img, bits, ("lungs",), f"montgomery:{path.stem}", rel,
                         partial(native_masks, halves, image.shape, p))
