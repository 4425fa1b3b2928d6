"""RSNA Pneumonia Detection Challenge (stage 2 training set).

Layout under `data.root`:

    stage_2_train_labels.csv          patientId,x,y,width,height,Target — one row per box; a negative
                                      image has one row with empty x/y/width/height and Target 0
    stage_2_detailed_class_info.csv   patientId,class (optional; one row per labels row)
    stage_2_train_images/<patientId>.dcm   (stage_2_test_images/ is unlabelled and ignored)

Labels: Pneumonia = Lung Opacity = Target (one annotation gives both). No Finding = 1 only for the
class "Normal" ("No Lung Opacity / Not Normal" is abnormal: 0), NaN when the class file is absent or
does not list the image. Every other canonical label is NaN. Boxes: one ("Pneumonia", x, y, w, h)
per Target-1 row, repeated under "Lung Opacity", mapped into prepared pixels like the image.

Privacy: in RSNA the file name and the CSV patientId equal the DICOM PatientID, so none of them is
ever written or logged. image_id = pseudonym(patientId, salt); patient_id = the salted hash of the
header PatientID (what the decoder reports as `patient_hash`; the pseudonym of patientId when the
header has none); source_path = "rsna/<image_id>", also for quarantined files. Mapping an output row
back to its file needs the salt ($CXR_ID_SALT or <project>/.cxr/id_salt): hash every patientId of the
CSV with `pseudonym(patientId, salt)` and match. pydicom's value-validation messages (which quote
header values) are silenced while this adapter reads headers and pixels.

Splits: by patient (the header PatientID, used in memory only, so the split does not depend on the
salt) with the data.split val/test fractions; RSNA has no official split of its labelled images.
Meta: age_years (header PatientAge such as "045", or an age column of the labels CSV), sex, view.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd

from pipeline.config import Params
from pipeline.data.decode import salted_hash
from pipeline.data.dicom import quiet_pydicom
from pipeline.data.record import Quarantined, Record
from pipeline.data.sources.common import (age_years, assign_splits, image_record, inside_root, limited, pseudonym,
                                          sex_of)

log = logging.getLogger(__name__)

LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
NORMAL = "Normal"
BOX_LABELS = ("Pneumonia", "Lung Opacity")
# optional per-image columns some copies of the labels CSV carry
_AGE_COLUMNS = ("PatientAge", "age", "Age", "patientAge")
_SEX_COLUMNS = ("PatientSex", "sex", "Sex", "patientSex")
_VIEW_COLUMNS = ("ViewPosition", "view", "View", "viewPosition")
_HEADER_TAGS = ["PatientID", "PatientAge", "PatientSex", "ViewPosition"]


@dataclass
class _Study:
    target: int
    boxes: list[tuple[float, float, float, float]]
    cls: str | None
    age: float | None
    sex: str | None
    view: str | None


def _first_column(frame: pd.DataFrame, names) -> str | None:
    return next((c for c in names if c in frame.columns), None)


def _read_studies(root: Path) -> tuple[dict[str, _Study], bool]:
    path = root / LABELS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"rsna: {LABELS_CSV} not found under data.root")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = {"patientId", "x", "y", "width", "height", "Target"} - set(frame.columns)
    if missing:
        raise ValueError(f"rsna: {LABELS_CSV} lacks columns {sorted(missing)}")
    frame["patientId"] = frame["patientId"].str.strip()
    frame = frame[frame["patientId"] != ""]
    nums = frame[["x", "y", "width", "height", "Target"]].apply(pd.to_numeric, errors="coerce")
    age_col, sex_col, view_col = (_first_column(frame, c) for c in (_AGE_COLUMNS, _SEX_COLUMNS, _VIEW_COLUMNS))

    classes: dict[str, str] = {}
    has_classes = (root / CLASS_CSV).is_file()
    if has_classes:
        cls = pd.read_csv(root / CLASS_CSV, dtype=str, keep_default_na=False, index_col=False)
        cls.columns = [str(c).strip() for c in cls.columns]
        if not {"patientId", "class"} <= set(cls.columns):
            raise ValueError(f"rsna: {CLASS_CSV} needs columns patientId,class")
        for pid, c in zip(cls["patientId"].str.strip(), cls["class"].str.strip()):
            classes.setdefault(pid, c)  # one row per labels row: the same class repeated

    extra = {name: frame[col].tolist() if col else [None] * len(frame)
             for name, col in (("age", age_col), ("sex", sex_col), ("view", view_col))}
    studies: dict[str, _Study] = {}
    for k, (pid, x, y, w, h, target) in enumerate(zip(frame["patientId"], nums["x"], nums["y"], nums["width"],
                                                      nums["height"], nums["Target"])):
        st = studies.get(pid)
        if st is None:
            view = str(extra["view"][k] or "").strip().upper() or None
            st = studies[pid] = _Study(target=0, boxes=[], cls=classes.get(pid), age=age_years(extra["age"][k]),
                                       sex=sex_of(extra["sex"][k]), view=view)
        if target == 1:
            st.target = 1
            if all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0:
                st.boxes.append((float(x), float(y), float(w), float(h)))
    return studies, has_classes


def _rel(pid: str) -> str:
    return f"{IMAGE_DIR}/{pid}.dcm"


def _header(root: Path, rel: str) -> dict:
    """The few header tags this adapter needs (pixels not read); {} when the file is unreadable or
    outside data.root (a patientId like `../x`), which the pixel decode then quarantines."""
    import pydicom

    try:
        ds = pydicom.dcmread(inside_root(root, rel), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        return {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS}
    except Exception:  # noqa: BLE001 - any unreadable header falls back to the CSV; decode decides
        return {}


def records(params: Params, salt: str) -> Iterator[Record | Quarantined]:
    p, root = params.data, Path(params.data.root)
    studies, has_classes = _read_studies(root)
    ids = list(limited(sorted(studies), p))

    # pass 1: headers only, so that patients (and their splits) are known before any pixel is read
    headers: dict[str, dict] = {}
    with quiet_pydicom():
        for pid in ids:
            headers[pid] = _header(root, _rel(pid))
    patient_key = {pid: headers[pid].get("PatientID") or pid for pid in ids}
    split_of = assign_splits(patient_key.values(), p)

    counts: Counter = Counter()
    for pid in ids:
        st, hdr = studies[pid], headers[pid]
        image_id = pseudonym(pid, salt)
        opaque = f"rsna/{image_id}"
        patient_id = salted_hash(hdr["PatientID"], salt) if hdr.get("PatientID") else image_id
        labels = {"Pneumonia": float(st.target), "Lung Opacity": float(st.target)}
        if has_classes and st.cls is not None:
            labels["No Finding"] = 1.0 if st.cls == NORMAL and not st.target else 0.0
            counts["conflict"] += int(st.cls == NORMAL and st.target == 1)
        age = age_years(hdr.get("PatientAge")) if hdr.get("PatientAge") else st.age
        sex = sex_of(hdr.get("PatientSex")) or st.sex
        view = (hdr.get("ViewPosition") or "").upper() or st.view
        counts["images"] += 1
        counts["positive"] += st.target
        counts[split_of[patient_key[pid]]] += 1
        yield image_record(root, _rel(pid), p, salt, shown_as=opaque, redact={pid: image_id},
                           image_id=image_id, patient_id=patient_id, split=split_of[patient_key[pid]],
                           labels=labels, boxes_px=[(lab, *b) for b in st.boxes for lab in BOX_LABELS],
                           meta={"age_years": age, "sex": sex}, view=view)
    if counts["conflict"]:
        log.warning("rsna: %d images have class Normal but Target 1; No Finding set to 0", counts["conflict"])
    log.info("rsna: %d images listed (%d positive), train/val/test %d/%d/%d, No Finding %s",
             counts["images"], counts["positive"], counts["train"], counts["val"], counts["test"],
             "from the class file" if has_classes else "unknown (no class file)")
