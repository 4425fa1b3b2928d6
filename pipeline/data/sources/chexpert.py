"""CheXpert (Stanford): ``CheXpert-v1.0-small/{train.csv,valid.csv,train/...,valid/...}``.

``data.root`` may hold ``CheXpert-v1.0-small/`` (or the full-size ``CheXpert-v1.0/``), or be that
folder itself. The CSV ``Path`` column starts with the top folder's name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``); it is resolved against the
folder that holds the CSV, so either root works and a renamed top folder does too.

Labels: the 14 label columns are the canonical names. Per cell: ``1.0`` -> 1, ``0.0`` -> 0,
``-1.0`` (uncertain) -> the label's policy in ``chexpert.uncertainty`` (else
``chexpert.uncertainty_default``): ones -> 1, zeros -> 0, ignore -> NaN; a blank cell ("not
mentioned") -> ``chexpert.blank``: zeros -> 0, ignore -> NaN. CheXpert has no separate Pneumonia
source; its ``Pneumonia`` column maps like the others.

Views: ``Frontal/Lateral`` and ``AP/PA``. Frontal films take the ``AP/PA`` value (AP, PA, ...);
laterals are ``LL`` when ``AP/PA`` says so, else ``LAT``. ``chexpert.frontal_only`` (default) drops
laterals before anything else (``data.limit`` counts frontal films only then).
Meta: ``age_years`` (``Age``), ``sex`` (``M`` / ``F``; NaN when unknown).

Patients: the ``patientNNNNN`` folder of the path. Splits (always by patient): ``valid.csv`` ->
``test`` (radiologist-consensus labels); ``train.csv`` patients -> train / val, val drawn by patient
with ``data.split.val``. A patient in both CSVs stays in test and its train.csv films are listed in
reports/quarantine.csv. A film listed but missing or unreadable is quarantined too.

``data.limit`` takes the first N rows of an order that alternates between train.csv and valid.csv
(each in file order), so that a quick look still has a test split.
"""
from __future__ import annotations

import csv
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from pipeline.config import ChexpertParams, Params
from pipeline.data.labels import CANONICAL_LABELS
from pipeline.data.record import Quarantined, Record
from pipeline.data.sources.common import first_n, image_record, official_records

log = logging.getLogger(__name__)

FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
CSV_FILES = {"train.csv": "train", "valid.csv": "test"}
LABEL_COLUMNS: tuple[str, ...] = CANONICAL_LABELS  # CheXpert's 14 columns are the canonical names
SEX = {"male": "M", "female": "F", "m": "M", "f": "F"}

_TOP = re.compile(r"^CheXpert-v1\.0", re.IGNORECASE)
_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    rel: str                      # relative to data.root
    image_id: str                 # the CSV path below the top folder, without suffix
    official: str                 # train (train.csv) | test (valid.csv)
    patient: str
    view: str
    frontal: bool
    cells: tuple[str | None, ...]   # the raw label cells in LABEL_COLUMNS order (None: no such column)
    age_years: int | None = None
    sex: str | None = None


def policy_of(label: str, cx: ChexpertParams) -> str:
    return cx.uncertainty.get(label, cx.uncertainty_default)


def map_value(raw: str | float | None, label: str, cx: ChexpertParams) -> float:
    """One CSV cell -> 1.0 / 0.0 / NaN under the uncertainty and blank policies."""
    text = "" if raw is None else str(raw).strip()
    if text == "" or text.lower() == "nan":
        return 0.0 if cx.blank == "zeros" else math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"chexpert: {label!r} holds {text!r}; expected 1.0, 0.0, -1.0 or blank") from None
    if value == 1.0:
        return 1.0
    if value == 0.0:
        return 0.0
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy_of(label, cx)]
    raise ValueError(f"chexpert: {label!r} holds {text!r}; expected 1.0, 0.0, -1.0 or blank")


def _map_cells(cells: tuple[str | None, ...], cx: ChexpertParams) -> dict[str, float]:
    """Canonical labels of one CSV row's label cells (in LABEL_COLUMNS order); NaN ones (ignored, or a
    column the CSV lacks) are left out."""
    out = {}
    for label, cell in zip(LABEL_COLUMNS, cells):
        if cell is not None:
            value = map_value(cell, label, cx)
            if not math.isnan(value):
                out[label] = value
    return out


def view_of(row: dict[str, str]) -> tuple[str, bool]:
    """(view, is frontal) from the `Frontal/Lateral` and `AP/PA` columns."""
    frontal = (row.get("Frontal/Lateral") or "Frontal").strip().lower() != "lateral"
    ap_pa = (row.get("AP/PA") or "").strip().upper()
    if frontal:
        return ap_pa or "PA", True
    return ("LL" if ap_pa == "LL" else "LAT"), False


def patient_of(path: str) -> str:
    """The `patientNNNNN` part of a CSV path (else the folder above the study)."""
    parts = PurePosixPath(path).parts
    for part in parts:
        if _PATIENT.match(part):
            return part.lower()
    return parts[-3] if len(parts) >= 3 else parts[0]


def meta_of(row: dict[str, str]) -> dict:
    age = (row.get("Age") or "").strip()
    try:
        age_years = int(float(age))
    except ValueError:
        age_years = None
    return {"age_years": age_years, "sex": SEX.get((row.get("Sex") or "").strip().lower())}


def _cell(row: dict[str, str], label: str) -> str | None:
    """A label cell, validated and interned (a big CSV holds few distinct cell texts)."""
    if label not in row:
        return None
    text = sys.intern((row[label] or "").strip())
    map_value(text, label, ChexpertParams())  # fail on a bad cell at scan time, naming the label
    return text


def find_base(root: Path) -> Path:
    """The folder holding train.csv / valid.csv: root itself or its CheXpert-v1.0(-small) folder."""
    candidates = [root, *(root / f for f in FOLDERS)]
    if root.is_dir():
        candidates += [c for c in sorted(root.iterdir()) if c.is_dir() and _TOP.match(c.name)]
    for base in candidates:
        if any((base / name).is_file() for name in CSV_FILES):
            return base
    raise ValueError(f"chexpert: no train.csv / valid.csv in {root} or its {' / '.join(FOLDERS)} folder")


def csv_path_to_file(base: Path, path: str) -> PurePosixPath:
    """A CSV `Path` relative to `base` (the folder holding the CSV): the top folder name is dropped."""
    parts = PurePosixPath(path.strip().replace("\\", "/")).parts
    if len(parts) > 1 and _TOP.match(parts[0]):
        parts = parts[1:]
    return PurePosixPath(*parts)


def scan(root: Path, cx: ChexpertParams) -> dict[str, list[Item]]:
    """CSV name -> its rows as items (file order; laterals dropped under frontal_only)."""
    base = find_base(root)
    out: dict[str, list[Item]] = {}
    for name, official in CSV_FILES.items():
        if not (base / name).is_file():
            continue
        items, seen = [], set()
        with open(base / name, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if "Path" not in (reader.fieldnames or []):
                raise ValueError(f"chexpert: {name} has no 'Path' column")
            for row in reader:
                inner = csv_path_to_file(base, row["Path"])
                view, frontal = view_of(row)
                if (cx.frontal_only and not frontal) or str(inner) in seen:
                    continue
                seen.add(str(inner))
                # joined, not resolved: a `../` or absolute Path stays as the CSV says, and is
                # quarantined when read (sources.common.inside_root) instead of failing the scan
                items.append(Item(rel=(base.relative_to(root) / inner).as_posix(),
                                  image_id=str(inner.with_suffix("")), official=official,
                                  patient=patient_of(str(inner)), view=view, frontal=frontal,
                                  cells=tuple(_cell(row, label) for label in LABEL_COLUMNS), **meta_of(row)))
        out[name] = items
    return out


def records(params: Params, salt: str = "") -> Iterator[Record | Quarantined]:
    p, root = params.data, Path(params.data.root)
    # train.csv rows first, then valid.csv; a limit alternates between the two
    items = first_n([it for rows in scan(root, params.chexpert).values() for it in rows], p,
                    group=lambda it: it.official)
    counts: Counter = Counter()
    def record(it, split):
        return image_record(root, it.rel, p, salt, image_id=it.image_id, patient_id=it.patient, split=split,
                            labels=_map_cells(it.cells, params.chexpert),
                            meta={"age_years": it.age_years, "sex": it.sex}, view=it.view)

    yield from official_records(items, p, lambda it: it.official, record, counts)
    log.info("chexpert: %d films of %d patients from %s listed (train %d, val %d, test %d; %d left out: patient in two splits; %s)",
             len(items), len({it.patient for it in items}), root, counts["train"], counts["val"], counts["test"],
             counts["quarantined"], "frontal only" if params.chexpert.frontal_only else "frontal and lateral")
