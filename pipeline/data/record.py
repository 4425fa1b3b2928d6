"""What every source yields per image: the one dataset contract all sources share."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

# Bit flags of the anatomy mask store (a pixel can be both: the heart overlaps the medial lungs).
LUNGS_BIT = 1
HEART_BIT = 2


@dataclass
class Record:
    image: np.ndarray                 # uint8 (S, S), already at data.image_size
    image_id: str
    patient_id: str
    split: str
    source_path: str
    labels: dict[str, float]          # canonical label -> 1.0 / 0.0 (absent = NaN)
    view: str = "PA"
    boxes: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # (label, x, y, w, h)
    anatomy: np.ndarray | None = None  # uint8 bit mask (LUNGS_BIT | HEART_BIT) when ground truth exists
    meta: dict = field(default_factory=dict)  # optional: age_years, sex, and source-specific columns


@dataclass
class Quarantined:
    """A file a source could not use: listed in reports/quarantine.csv, and the run goes on."""
    source_path: str                  # relative to data.root
    reason: str                       # one line; never a patient identifier


@dataclass(frozen=True)
class Pending:
    """Decoding a source defers so that it can run anywhere (a Dask worker): `fn(*args)` reads the
    pixels and returns what the source would have yielded (a Record, a Quarantined row, or a list of
    them). Sources list their files cheaply and leave the pixels to `load`."""
    fn: Callable
    args: tuple

    def load(self) -> list["Record | Quarantined"]:
        out = self.fn(*self.args)
        return out if isinstance(out, list) else [out]


def materialise(items: Iterable) -> Iterator["Record | Quarantined"]:
    """A source's stream with every Pending item loaded here, in order."""
    for item in items:
        if isinstance(item, Pending):
            yield from item.load()
        else:
            yield item


def encode_anatomy(lungs: np.ndarray, heart: np.ndarray) -> np.ndarray:
    return (lungs.astype(np.uint8) * LUNGS_BIT) | (heart.astype(np.uint8) * HEART_BIT)


def decode_anatomy(mask: np.ndarray, structure: str) -> np.ndarray:
    """Bool mask of 'lungs', 'heart' or 'both' from a bit-mask array (any leading shape)."""
    if structure == "lungs":
        return (mask & LUNGS_BIT) > 0
    if structure == "heart":
        return (mask & HEART_BIT) > 0
    if structure == "both":
        return mask > 0
    raise ValueError(f"unknown anatomy {structure!r}")
