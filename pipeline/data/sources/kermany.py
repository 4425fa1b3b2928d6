"""Kermany et al. paediatric pneumonia films (Kaggle "chest-xray-pneumonia", Guangzhou, AP views).

Layout: ``<root>/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; ``data.root`` may be the
folder that holds ``chest_xray/`` or ``chest_xray/`` itself. The Kaggle zip also nests a duplicate
``chest_xray/chest_xray/`` and an ``__MACOSX/`` tree: only the outermost folder that has the
split folders is read, so no film is read twice, and OS junk (``._*``, ``.DS_Store``, ``Thumbs.db``)
is skipped. JPEGs come in many sizes, grayscale and RGB; the decoder makes them grayscale.

Labels: ``Pneumonia`` = 1 (``PNEUMONIA/``) or 0 (``NORMAL/``); every other label is NaN.
Meta: ``pneumonia_type`` = ``bacteria`` | ``virus`` from the file name (NaN for normal films).

Patients, from the file name: ``person1_bacteria_1.jpeg`` and ``person1_virus_6.jpeg`` -> ``person1``;
``IM-0115-0001.jpeg`` and ``IM-0115-0001-0002.jpeg`` -> ``IM-0115``;
``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``; any other
name -> its stem. The two naming schemes never collide, so normal and pneumonia patients stay apart.

Person numbers restart in each official split: on the full dataset all 170 numbers found in both
train and test name a different pneumonia type on each side (``person100_virus_184`` in train,
``person100_bacteria_475`` in test), so they are different children. The patient id is therefore
namespaced by the official folder a film is read from (``train/person100``, ``test/person100``), and
no film is lost to a cross-split quarantine; a folded-in official ``val/`` counts as train (its films
join the train pool, so a number shared with train stays one patient there). Sources whose ids are
global (NIH, CheXpert, RSNA) keep the cross-split quarantine.

Splits (always by patient): the official ``test/`` stays ``test``. The official ``val/`` holds only
16 films, too few to select checkpoints on, so with ``kermany.resplit_val: true`` (the default) it
is folded into train and ``val`` is drawn by patient from the pooled train patients with
``data.split.val``; with ``resplit_val: false`` the official ``val/`` is kept as ``val``.

``data.limit`` takes the first N files of an order that alternates between official folders and
classes (each in sorted order), so that a quick look still has every split and both classes.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from pipeline.config import Params
from pipeline.data.record import Quarantined, Record
from pipeline.data.sources.common import first_n, image_record, is_junk, official_records, subfolders

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CLASSES = {"NORMAL": 0.0, "PNEUMONIA": 1.0}
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
VIEW = "AP"

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)(?:_.*)?$", re.IGNORECASE)
_NORMAL = re.compile(r"^(.*?IM-\d+)(?:-\d+)+$", re.IGNORECASE)  # IM-0491-0001-0002 too


@dataclass(frozen=True)
class Item:
    rel: str          # relative to data.root
    image_id: str     # <official split>/<class>/<stem>: the same whichever root was given
    official: str     # the official folder: train | val | test
    cls: str          # NORMAL | PNEUMONIA
    patient: str
    pneumonia_type: str | None


def parse_name(stem: str) -> tuple[str, str | None]:
    """(patient id, pneumonia type or None) from a file stem."""
    m = _PERSON.match(stem)
    if m:
        return m.group(1).lower(), m.group(2).lower()
    m = _NORMAL.match(stem)
    if m:
        return m.group(1), None
    return stem, None


def labels_of(cls: str) -> dict[str, float]:
    """Canonical labels of a class folder: only Pneumonia is known."""
    return {"Pneumonia": CLASSES[cls.upper()]}


def find_base(root: Path) -> Path:
    """The folder holding {train,val,test}/{NORMAL,PNEUMONIA}: root, root/chest_xray, or the zip's nested copy."""
    for base in (root, root / "chest_xray", root / "chest_xray" / "chest_xray"):
        splits = subfolders(base)
        if any(set(subfolders(splits.get(s.upper()))) & set(CLASSES) for s in SPLITS):
            return base
    raise ValueError(f"kermany: no {{train,val,test}}/{{NORMAL,PNEUMONIA}} folders in {root} or {root / 'chest_xray'}")


def scan(root: Path) -> list[Item]:
    """Every usable-looking film under the chosen base folder, sorted by path."""
    base = find_base(root)
    items = []
    splits = subfolders(base)
    for split in SPLITS:
        for cls, folder in subfolders(splits.get(split.upper())).items():
            if cls not in CLASSES:
                continue
            for path in sorted(folder.iterdir()):
                if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or is_junk(path.name):
                    continue
                patient, kind = parse_name(path.stem)
                items.append(Item(rel=path.relative_to(root).as_posix(), image_id=f"{split}/{cls}/{path.stem}",
                                  official=split, cls=cls, patient=patient, pneumonia_type=kind))
    return sorted(items, key=lambda it: it.rel)


def records(params: Params, salt: str = "") -> Iterator[Record | Quarantined]:
    p, root = params.data, Path(params.data.root)
    items = first_n(scan(root), p, group=lambda it: (it.official, it.cls))

    def official(it: Item) -> str:
        return "train" if (it.official == "val" and params.kermany.resplit_val) else it.official

    # ids are per official folder (see the module docstring), so no patient spans two of them
    items = [replace(it, patient=f"{official(it)}/{it.patient}") for it in items]
    counts: Counter = Counter()
    def record(it, split):
        return image_record(root, it.rel, p, salt, image_id=it.image_id, patient_id=it.patient, split=split,
                            labels=labels_of(it.cls), meta={"pneumonia_type": it.pneumonia_type}, view=VIEW)

    yield from official_records(items, p, official, record, counts)
    log.info("kermany: %d films of %d patients from %s listed (train %d, val %d, test %d; %d left out; val %s)",
             len(items), len({it.patient for it in items}), root, counts["train"], counts["val"], counts["test"],
             counts["quarantined"], "re-drawn from train" if params.kermany.resplit_val else "official")
