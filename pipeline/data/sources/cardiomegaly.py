"""The Kaggle cardiomegaly set: 128x128 PNG crops of NIH ChestX-ray14 frontal films.

Layout: ``<root>/train/{true,false}/*.png`` and ``<root>/test/{true,false}/*.png``. Also accepted:
the download's nesting (``train/train/true``), and ``data.root`` being the folder one level above
(the unzipped archive folder). OS junk (``__MACOSX/``, ``._*``, ``.DS_Store``, ``Thumbs.db``) is skipped.

Labels: ``Cardiomegaly`` = 1 (``true/``) or 0 (``false/``); every other label is NaN.

Patients: NIH names ``00000001_000.png`` carry the patient in their first 8 digits
(``00000001``); any other name is its own patient (the file stem).

Splits (always by patient): the official ``test/`` stays ``test``; ``val`` is drawn by patient from
the ``train/`` patients with ``data.split.val``. A patient with films in both official folders
(the set's split is not by patient) stays in test; its ``train/`` films are listed in
reports/quarantine.csv instead of leaking into training.

View: the set does not say; the common default (PA) is recorded.

``data.limit`` takes the first N files of an order that alternates between official folders and
classes (each in sorted order), so that a quick look still has both splits and both classes.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import Params
from pipeline.data.record import Quarantined, Record
from pipeline.data.sources.common import first_n, image_record, is_junk, official_records, subfolders

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
CLASSES = {"TRUE": 1.0, "FALSE": 0.0}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

_NIH = re.compile(r"^(\d{8})_\d{3}$")


@dataclass(frozen=True)
class Item:
    rel: str          # relative to data.root
    image_id: str     # <official split>/<class>/<stem>
    official: str     # train | test
    cls: str          # true | false
    patient: str


def patient_of(stem: str) -> str:
    """The NIH patient number of `00000001_000`-style names, else the stem itself."""
    m = _NIH.match(stem)
    return m.group(1) if m else stem


def labels_of(cls: str) -> dict[str, float]:
    """Canonical labels of a class folder: only Cardiomegaly is known."""
    return {"Cardiomegaly": CLASSES[cls.upper()]}


def split_folder(base: Path, split: str) -> Path | None:
    """`base/split` holding the class folders, or the download's nested `base/split/split`."""
    outer = subfolders(base).get(split.upper())
    for folder in (outer, subfolders(outer).get(split.upper())):
        if set(subfolders(folder)) & set(CLASSES):
            return folder
    return None


def find_base(root: Path) -> Path:
    for base in (root, *subfolders(root).values()):
        if any(split_folder(base, s) for s in SPLITS):
            return base
    raise ValueError(f"cardiomegaly: no {{train,test}}/{{true,false}} folders in {root} or one level down")


def scan(root: Path) -> list[Item]:
    """Every film under the chosen base folder, sorted by path."""
    base = find_base(root)
    items = []
    for split in SPLITS:
        for cls, folder in subfolders(split_folder(base, split)).items():
            if cls not in CLASSES:
                continue
            for path in sorted(folder.iterdir()):
                if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or is_junk(path.name):
                    continue
                items.append(Item(rel=path.relative_to(root).as_posix(),
                                  image_id=f"{split}/{cls.lower()}/{path.stem}", official=split,
                                  cls=cls.lower(), patient=patient_of(path.stem)))
    return sorted(items, key=lambda it: it.rel)


def records(params: Params, salt: str = "") -> Iterator[Record | Quarantined]:
    p, root = params.data, Path(params.data.root)
    items = first_n(scan(root), p, group=lambda it: (it.official, it.cls))
    counts: Counter = Counter()
    def record(it, split):
        return image_record(root, it.rel, p, salt, image_id=it.image_id, patient_id=it.patient, split=split,
                            labels=labels_of(it.cls))

    yield from official_records(items, p, lambda it: it.official, record, counts)
    log.info("cardiomegaly: %d films of %d patients from %s listed (train %d, val %d, test %d; %d left out: patient in two splits)",
             len(items), len({it.patient for it in items}), root, counts["train"], counts["val"], counts["test"],
             counts["quarantined"])
