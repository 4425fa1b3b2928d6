"""NIH ChestX-ray14.

Layout under `data.root`:

    Data_Entry_2017.csv      Image Index, Finding Labels ("A|B" or "No Finding"), Follow-up #, Patient ID,
                             Patient Age (58 or "058Y"), Patient Gender, View Position,
                             OriginalImage[Width,Height], OriginalImagePixelSpacing[x,y] — the commas in the
                             last two headers split them, and some copies end every line with a comma
                             (an extra "Unnamed: 11" column); Data_Entry_2017_v2020.csv is read the same way
    BBox_List_2017.csv       Image Index, Finding Label, "Bbox [x", y, w, "h]" (+ empty unnamed columns):
                             boxes in original (1024 x 1024) pixels, for ~1,000 images
    images*/ (images_001/images/*.png ... images_012/images/ on Kaggle, or one images/ folder)
    train_val_list.txt, test_list.txt   the official patient-wise split, one image name per line

Labels (NIH's 14 findings are complete, so every mapped label is 1 when listed and 0 otherwise):
Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax as is; Effusion -> Pleural
Effusion; Mass, Nodule -> Lung Lesion (1 if either); Infiltration -> Lung Opacity; Pleural_Thickening ->
Pleural Other; No Finding -> No Finding. Emphysema, Fibrosis and Hernia have no canonical label and are
dropped; Enlarged Cardiomediastinum, Fracture and Support Devices are NaN. Box labels map the same way
(the box file says "Infiltrate").

Splits: with `nih.official_split` and test_list.txt present, every patient with an image in test_list
is test (all of that patient's images, so no patient spans two splits) and the other patients are
drawn train/val by patient with data.split.val; otherwise train/val/test are drawn by patient.
Ids: image_id = Image Index stem, patient_id = "nih:<Patient ID>" (NIH ids are already de-identified).
An image listed in the CSV but absent under images*/ is quarantined with its name.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd

from pipeline.config import Params
from pipeline.data.record import Quarantined, Record
from pipeline.data.sources.common import age_years, assign_splits, image_record, limited, sex_of

log = logging.getLogger(__name__)

ENTRY_CSVS = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
BBOX_CSV = "BBox_List_2017.csv"
TEST_LIST, TRAIN_VAL_LIST = "test_list.txt", "train_val_list.txt"

NIH_TO_CANONICAL: dict[str, str] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity",
    "Infiltrate": "Lung Opacity",       # the box file's spelling
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Pleural_Thickening": "Pleural Other",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "No Finding": "No Finding",
}
DROPPED = ("Emphysema", "Fibrosis", "Hernia")   # no canonical counterpart
PROVIDED = tuple(dict.fromkeys(NIH_TO_CANONICAL.values()))  # canonical labels NIH gives (0/1)


def _finding(name: str) -> str:
    name = name.strip()
    return "Pleural_Thickening" if name == "Pleural Thickening" else name


def map_findings(finding_labels: str) -> tuple[dict[str, float], set[str]]:
    """'Mass|Effusion' -> canonical labels (every provided label 0 or 1) and the unknown names."""
    labels = {label: 0.0 for label in PROVIDED}
    unknown = set()
    for name in filter(None, map(_finding, str(finding_labels).split("|"))):
        if name in NIH_TO_CANONICAL:
            labels[NIH_TO_CANONICAL[name]] = 1.0
        elif name not in DROPPED:
            unknown.add(name)
    return labels, unknown


def _patient(value) -> str:
    v = str(value).strip()
    return f"nih:{int(v)}" if v.isdigit() else f"nih:{v}"


def _read_csv(path: Path) -> pd.DataFrame:
    # index_col=False: lines ending in a comma must not turn the first column into the index; pandas
    # warns when only the data lines end in one (the empty last field is what it drops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def read_entries(root: Path) -> pd.DataFrame:
    """Data_Entry_2017.csv as strings, one row per image, sorted by Image Index."""
    path = next((root / n for n in ENTRY_CSVS if (root / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"nih: none of {', '.join(ENTRY_CSVS)} under data.root")
    frame = _read_csv(path)
    missing = {"Image Index", "Finding Labels", "Patient ID"} - set(frame.columns)
    if missing:
        raise ValueError(f"nih: {path.name} lacks columns {sorted(missing)}")
    for col in ("Patient Age", "Patient Gender", "View Position"):
        if col not in frame.columns:
            frame[col] = ""
    frame["Image Index"] = frame["Image Index"].str.strip()
    frame = frame[frame["Image Index"] != ""]
    dup = int(frame["Image Index"].duplicated().sum())
    if dup:
        log.warning("nih: %d duplicate rows in %s; keeping the first of each", dup, path.name)
        frame = frame.drop_duplicates("Image Index")
    return frame.sort_values("Image Index", kind="stable").reset_index(drop=True)


def read_boxes(root: Path) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """Image Index -> [(canonical label, x, y, w, h)] in original pixels. The header is
    'Image Index,Finding Label,Bbox [x,y,w,h],,,': the values sit under 'Bbox [x', 'y', 'w', 'h]'."""
    path = root / BBOX_CSV
    if not path.is_file():
        return {}
    frame = _read_csv(path)
    cols = list(frame.columns)
    start = next((i for i, c in enumerate(cols) if c.lower().startswith("bbox")), None)
    if start is None or len(cols) < start + 4 or "Image Index" not in cols or "Finding Label" not in cols:
        raise ValueError(f"nih: {BBOX_CSV} does not have the expected header 'Image Index,Finding Label,Bbox [x,y,w,h]'")
    xywh = frame[cols[start:start + 4]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    out: dict[str, list] = {}
    skipped = Counter()
    for name, label, (x, y, w, h) in zip(frame["Image Index"].str.strip(), frame["Finding Label"], xywh):
        canonical = NIH_TO_CANONICAL.get(_finding(label))
        if canonical is None or not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            skipped[_finding(label) if canonical is None else "invalid coordinates"] += 1
            continue
        out.setdefault(name, []).append((canonical, float(x), float(y), float(w), float(h)))
    if skipped:
        log.warning("nih: skipped %d box rows: %s", sum(skipped.values()), dict(skipped))
    return out


def index_images(root: Path) -> dict[str, str]:
    """Image file name -> path relative to root, from images*/images/ (Kaggle) or images*/ folders."""
    found: dict[str, str] = {}
    dups = 0
    for folder in sorted(d for d in root.glob("images*") if d.is_dir()):
        for sub in (folder / "images", folder):
            if not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for entry in sorted(it, key=lambda e: e.name):
                    if entry.name.lower().endswith(".png") and entry.is_file():
                        if entry.name in found:
                            dups += 1
                        else:
                            found[entry.name] = Path(entry.path).relative_to(root).as_posix()
    if dups:
        log.warning("nih: %d image names occur in more than one images*/ folder; using the first", dups)
    return found


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def splits(root: Path, names: list[str], patient_of: dict[str, str], params: Params) -> dict[str, str]:
    """patient -> split (see the module docstring)."""
    p = params.data
    patients = sorted(set(patient_of[n] for n in names))
    if not (params.nih.official_split and (root / TEST_LIST).is_file()):
        if params.nih.official_split:
            log.warning("nih: %s not found; drawing train/val/test by patient", TEST_LIST)
        return assign_splits(patients, p)
    test_names = _read_list(root / TEST_LIST)
    test_patients = {patient_of[n] for n in names if n in test_names}
    moved = sum(1 for n in names if n not in test_names and patient_of[n] in test_patients)
    if moved:
        log.warning("nih: %d images outside %s belong to its patients; kept in test so no patient spans "
                    "two splits", moved, TEST_LIST)
    if (root / TRAIN_VAL_LIST).is_file():
        train_val = _read_list(root / TRAIN_VAL_LIST)
        unlisted = sum(1 for n in names if n not in test_names and n not in train_val)
        if unlisted:
            log.warning("nih: %d images are in neither split list; drawn as train/val", unlisted)
    # train_val patients: val drawn by patient with data.split.val, no test drawn from them
    train_val_params = p.model_copy(update={"split": p.split.model_copy(update={"test": 0.0, "test_shifted": 0.0})})
    out = assign_splits(set(patients) - test_patients, train_val_params)
    out.update({pt: "test" for pt in test_patients})
    return out


def records(params: Params, salt: str = "") -> Iterator[Record | Quarantined]:
    """NIH ids are public and de-identified, so `salt` only reaches the decoder."""
    p, root = params.data, Path(params.data.root)
    entries = read_entries(root)
    rows = list(limited(entries.itertuples(index=False), p))
    names = [r[entries.columns.get_loc("Image Index")] for r in rows]
    col = {c: entries.columns.get_loc(c) for c in ("Finding Labels", "Patient ID", "Patient Age",
                                                    "Patient Gender", "View Position")}
    patient_of = {n: _patient(r[col["Patient ID"]]) for n, r in zip(names, rows)}
    split_of = splits(root, names, patient_of, params)
    files, boxes = index_images(root), read_boxes(root)

    counts, unknown = Counter(), Counter()
    for name, row in zip(names, rows):
        rel = files.get(name)
        if rel is None:
            counts["missing"] += 1
            yield Quarantined(name, "listed in the data entry CSV but not found under images*/")
            continue
        labels, unk = map_findings(row[col["Finding Labels"]])
        unknown.update(unk)
        view = str(row[col["View Position"]]).strip().upper() or None
        counts["images"] += 1
        counts[split_of[patient_of[name]]] += 1
        counts["boxes"] += len(boxes.get(name, []))
        yield image_record(root, rel, p, salt, image_id=Path(name).stem, patient_id=patient_of[name],
                           split=split_of[patient_of[name]], labels=labels, boxes_px=boxes.get(name, []),
                           meta={"age_years": age_years(row[col["Patient Age"]]),
                                 "sex": sex_of(row[col["Patient Gender"]])},
                           view=view)
    if unknown:
        log.warning("nih: unknown finding names ignored: %s", dict(unknown))
    log.info("nih: %d images of %d patients listed, train/val/test %d/%d/%d, %d boxes, %d missing, split %s",
             counts["images"], len(set(patient_of.values())), counts["train"], counts["val"], counts["test"],
             counts["boxes"], counts["missing"],
             "official" if params.nih.official_split and (root / TEST_LIST).is_file() else "drawn by patient")
