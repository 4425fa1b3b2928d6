"""Each real-dataset adapter on a small fixture in that dataset's own layout, through `prepare` (no training):
label mapping, patient-level and official splits, box mapping, quarantine, privacy, data.limit."""
from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import Params, Paths
from pipeline.data.labels import CANONICAL_LABELS
from pipeline.data.manifest import validate_manifest
from pipeline.data.prepare import prepare, source_module
from pipeline.data.record import Quarantined, materialise
from pipeline.data.sources.common import id_salt, pseudonym
from pipeline.data.store import ArrayStore
from tests.conftest import tiny_params

SOURCES = ("kermany", "cardiomegaly", "chexpert", "rsna", "nih")
MAIN_LABEL = {"kermany": "Pneumonia", "cardiomegaly": "Cardiomegaly", "chexpert": "Pneumonia",
              "rsna": "Pneumonia", "nih": "Cardiomegaly"}
PROVIDED = {
    "kermany": {"Pneumonia"},
    "cardiomegaly": {"Cardiomegaly"},
    "chexpert": set(CANONICAL_LABELS),
    "rsna": {"Pneumonia", "Lung Opacity", "No Finding"},
    "nih": set(CANONICAL_LABELS) - {"Enlarged Cardiomediastinum", "Fracture", "Support Devices"},
}


class Prepared:
    """What `prepare` wrote for one params set."""

    def __init__(self, project: Path, summary: dict):
        paths = Paths(project)
        self.summary, self.paths = summary, paths
        self.manifest = pd.read_parquet(paths.manifest)
        self.boxes = pd.read_parquet(paths.boxes)
        self.quarantine = pd.read_csv(paths.quarantine)
        self.salt = id_salt(project)

    def row(self, image_id: str) -> pd.Series:
        rows = self.manifest[self.manifest["image_id"] == image_id]
        assert len(rows) == 1, image_id
        return rows.iloc[0]


def make_params(source: str, root: Path, section: dict | None = None, **data) -> Params:
    raw = tiny_params()
    raw["data"].update(source=source, root=str(root), **data)
    for name, values in (section or {}).items():
        raw.setdefault(name, {}).update(values)
    return Params.model_validate(raw)


def run(tmp_path: Path, params: Params, name: str = "project") -> Prepared:
    project = tmp_path / name
    return Prepared(project, prepare(params, Paths(project)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """source -> (dataset root, facts), each fixture written once for the module."""
    out = {}
    for source in SOURCES:
        root = tmp_path_factory.mktemp(source)
        out[source] = (root, importlib.import_module(f"tests.fixtures.{source}").build(root))
    return out


@pytest.fixture(scope="module")
def default(built, tmp_path_factory):
    """source -> Prepared with the default params."""
    return {s: run(tmp_path_factory.mktemp(f"prep_{s}"), make_params(s, built[s][0])) for s in SOURCES}


# -- every source ----------------------------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES)
def test_contract_splits_and_quarantine(source, built, default):
    facts, prep = built[source][1], default[source]
    m = validate_manifest(prep.manifest)
    assert len(m) == facts["n_images"] == prep.summary["n_images"]
    assert {lab for lab in CANONICAL_LABELS if m[lab].notna().any()} == PROVIDED[source]
    assert set(m["split"]) == {"train", "val", "test"}  # real data: never test_shifted
    label = MAIN_LABEL[source]
    for split, g in m.groupby("split"):  # training needs both classes everywhere (AUROC defined)
        assert set(g[label].dropna()) == {0.0, 1.0}, (split, label)
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    images = ArrayStore(prep.paths.images)
    assert len(images) == len(m) and images.shape[1:] == (64, 64)
    q = prep.quarantine
    assert list(q.columns) == ["source_path", "reason"] and q["reason"].str.len().min() > 5
    if source != "rsna":  # RSNA's paths are opaque (checked in its own test)
        assert set(facts["corrupt"]) <= set(q["source_path"])
        assert not set(q["source_path"]) & set(m["source_path"])
    assert len(q) == prep.summary["quarantined"] >= len(facts["corrupt"])


@pytest.mark.parametrize("source", SOURCES)
def test_limit_reads_the_first_n(source, built):
    root, _ = built[source]
    params = make_params(source, root, limit=10)
    recs = list(materialise(source_module(source).records(params, "salt")))
    assert len(recs) == 10
    kept = [r for r in recs if not isinstance(r, Quarantined)]
    if source in ("kermany", "cardiomegaly", "chexpert"):  # a quick look keeps every official split
        assert "test" in {r.split for r in kept} and "train" in {r.split for r in kept}
    if source in ("kermany", "cardiomegaly"):
        assert {r.labels[MAIN_LABEL[source]] for r in kept} == {0.0, 1.0}


# -- kermany ---------------------------------------------------------------------------------------

def test_kermany_labels_patients_and_splits(built, default):
    facts, prep = built["kermany"][1], default["kermany"]
    m = prep.manifest.set_index("source_path")
    assert set(m.index) == set(facts["usable"])
    for rel, f in facts["usable"].items():
        row = m.loc[rel]
        assert row["Pneumonia"] == (1.0 if f["cls"] == "PNEUMONIA" else 0.0)
        home = "train" if f["official"] == "val" else f["official"]  # the official val is folded into train
        assert row["patient_id"] == f"{home}/{f['patient']}" and row["view"] == "AP"
        assert (row["pneumonia_type"] if f["type"] else None) == f["type"]
        if f["official"] == "test":
            assert row["split"] == "test"
        else:  # the official val is folded into train and val is drawn by patient
            assert row["split"] in ("train", "val")
    official_val = set(facts["official_val"])
    val = set(m.index[m["split"] == "val"])
    assert val and val != official_val
    # the IM-NNNN-0001-0002 naming is the same patient as IM-NNNN-0001
    assert (m["patient_id"].str.count("-") <= 2).all() and m["image_id"].is_unique
    # person numbers restart per official split: person1 in train and person1 in test are two children,
    # both kept, each in its own split
    assert facts["leaked"] not in set(prep.quarantine["source_path"])
    assert m.loc[facts["leaked"], "split"] in ("train", "val") and m.loc[facts["leaked_home"], "split"] == "test"
    assert m.loc[facts["leaked"], "patient_id"] != m.loc[facts["leaked_home"], "patient_id"]
    # zip litter is neither read nor quarantined
    assert not any("__MACOSX" in p or "/." in p for p in [*m.index, *prep.quarantine["source_path"]])


def test_kermany_official_val_kept(built, tmp_path):
    root, facts = built["kermany"]
    prep = run(tmp_path, make_params("kermany", root, section={"kermany": {"resplit_val": False}}))
    m = prep.manifest.set_index("source_path")
    assert set(m.index[m["split"] == "val"]) == set(facts["official_val"])
    assert set(m.index[m["split"] == "test"]) == {r for r, f in facts["usable"].items() if f["official"] == "test"}


def test_kermany_root_may_be_chest_xray(built, tmp_path):
    root, facts = built["kermany"]
    recs = list(materialise(source_module("kermany").records(make_params("kermany", root / "chest_xray"), "")))
    kept = [r for r in recs if not isinstance(r, Quarantined)]
    assert len(kept) == facts["n_images"] and all(not r.source_path.startswith("chest_xray/") for r in kept)
    by_root = {r.image_id for r in materialise(source_module("kermany").records(make_params("kermany", root), ""))
               if not isinstance(r, Quarantined)}
    assert {r.image_id for r in kept} == by_root  # ids do not depend on which root was given


def test_kermany_real_file_names_lose_no_film(real_data):
    """On the real Kaggle names, person numbers restart per official split: 0 of 5,840 films left out,
    and still no patient id spans two splits."""
    root = real_data / "kermany-224" / "chest_xray"
    recs = list(source_module("kermany").records(make_params("kermany", root), ""))
    left_out = [r for r in recs if isinstance(r, Quarantined)]
    assert len(recs) == 5840 and left_out == []
    fields = [r.args[-1] for r in recs]  # listed, not decoded: Pending(load_image_record, (..., fields))
    splits_of: dict = {}
    for f in fields:
        splits_of.setdefault(f["patient_id"], set()).add(f["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    official = {f["image_id"].split("/")[0] for f in fields}
    assert official == {"train", "test"}
    # the 170 numbers shared by train and test are kept apart, as different children
    shared = {p.split("/", 1)[1] for p in splits_of if p.startswith("test/")} & \
             {p.split("/", 1)[1] for p in splits_of if p.startswith("train/")}
    assert len({p for p in shared if p.startswith("person")}) == 170


# -- cardiomegaly ----------------------------------------------------------------------------------

def test_cardiomegaly_labels_and_official_test(built, default):
    facts, prep = built["cardiomegaly"][1], default["cardiomegaly"]
    m = prep.manifest.set_index("source_path")
    assert set(m.index) == set(facts["usable"])
    for rel, f in facts["usable"].items():
        assert m.loc[rel, "Cardiomegaly"] == (1.0 if f["cls"] == "true" else 0.0)
        assert m.loc[rel, "patient_id"] == f["patient"]
        assert (m.loc[rel, "split"] == "test") == (f["official"] == "test")
    assert set(facts["leaked"]) <= set(prep.quarantine["source_path"])
    assert m.loc[facts["leaked_home"], "split"] == "test"


def test_cardiomegaly_nested_download_layout(tmp_path):
    from tests.fixtures import cardiomegaly

    facts = cardiomegaly.build(tmp_path / "ds", nested=True)
    recs = list(materialise(source_module("cardiomegaly").records(make_params("cardiomegaly", tmp_path / "ds"), "")))
    kept = [r for r in recs if not isinstance(r, Quarantined)]
    assert {r.source_path for r in kept} == set(facts["usable"])
    assert all(r.source_path.startswith(("train/train/", "test/test/")) for r in kept)


# -- chexpert --------------------------------------------------------------------------------------

def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_chexpert_policies_views_and_splits(built, default):
    facts, prep = built["chexpert"][1], default["chexpert"]
    known = prep.row(facts["known_image_id"])
    for label, expected in facts["known_expected"].items():
        assert _same(float(known[label]), expected), label
    m = prep.manifest.set_index("source_path")
    frontal = {rel: f for rel, f in facts["usable"].items() if f["frontal"]}
    assert set(m.index) == set(frontal)  # frontal_only: laterals dropped before anything else
    for rel, f in frontal.items():
        row = m.loc[rel]
        assert row["patient_id"] == f["patient"] and row["view"] == f["view"]
        assert row["image_id"] == f["image_id"] and row["age_years"] == f["age"]
        assert (row["sex"] if isinstance(row["sex"], str) else None) == f["sex"]
        assert (row["split"] == "test") == (f["csv"] == "valid")  # valid.csv -> test
        assert row["Pneumonia"] == float(f["pneumonia"])  # 1.0, or 0.0 / blank (-> 0)
    assert set(facts["leaked"]) <= set(prep.quarantine["source_path"])
    assert (m[m["patient_id"] == "patient00004"]["split"] == "test").all()


def test_chexpert_blank_ignore_uncertainty_override_and_laterals(built, tmp_path):
    root, facts = built["chexpert"]
    prep = run(tmp_path, make_params("chexpert", root, section={"chexpert": {
        "blank": "ignore", "frontal_only": False, "uncertainty": {"Lung Opacity": "ones"},
        "uncertainty_default": "zeros"}}))
    known = prep.row(facts["known_image_id"])
    assert math.isnan(known["No Finding"]) and math.isnan(known["Pneumothorax"])  # blank -> NaN
    assert known["Lung Opacity"] == 1.0   # per-label override
    assert known["Atelectasis"] == 0.0    # not listed any more: the default (zeros) applies
    assert len(prep.manifest) == facts["n_images_all_views"]
    laterals = prep.manifest[prep.manifest["image_id"].str.endswith("_lateral")]
    assert len(laterals) and set(laterals["view"]) == {"LAT"}
    validate_manifest(prep.manifest)


# -- rsna ------------------------------------------------------------------------------------------

def test_rsna_labels_boxes_and_privacy(built, tmp_path, caplog, capfd):
    root, facts = built["rsna"]
    caplog.set_level(logging.DEBUG)
    prep = run(tmp_path, make_params("rsna", root))
    m = prep.manifest
    by_id = {pseudonym(pid, prep.salt): pid for pid in facts["patient_ids"]}
    assert set(m["image_id"]) == {i for i, pid in by_id.items() if pid not in facts["corrupt"]}
    assert set(prep.quarantine["source_path"]) == {f"rsna/{pseudonym(p, prep.salt)}" for p in facts["corrupt"]}
    for _, row in m.iterrows():
        f = facts["images"][by_id[row["image_id"]]]
        assert row["Pneumonia"] == row["Lung Opacity"] == f["target"]
        assert row["No Finding"] == (1.0 if f["class"] == "Normal" else 0.0)
        assert row["source_path"] == f"rsna/{row['image_id']}" and row["view"] in ("PA", "AP")
        got = sorted(tuple(b) for b in prep.boxes[(prep.boxes["image_id"] == row["image_id"])
                                                  & (prep.boxes["label"] == "Pneumonia")][["x", "y", "w", "h"]]
                     .itertuples(index=False))
        k = 64 / f["size"]  # stretch of a square film to 64 px: every coordinate scales by k
        assert got == sorted(tuple(int(v * k) for v in b) for b in f["boxes"])
    assert set(prep.boxes["label"]) == {"Pneumonia", "Lung Opacity"} and len(prep.boxes) == facts["n_boxes"]
    # neither the patientId (= file name = PatientID) nor PatientName appears in any output or log
    secrets = set(facts["patient_ids"]) | {n for n in facts["patient_names"]}
    texts = [m.astype(str).to_csv(), prep.boxes.astype(str).to_csv(), prep.paths.quarantine.read_text(),
             prep.paths.grid.read_text(), caplog.text, *capfd.readouterr()]
    texts += [p.read_text(errors="ignore") for p in prep.paths.prepared.rglob("*") if p.is_file()]
    for text in texts:
        assert not any(s in text for s in secrets)
    assert not any(s.split("-")[0] in text for s in facts["patient_ids"] for text in texts[:4])


# -- nih -------------------------------------------------------------------------------------------

NIH_EXPECTED = {  # NIH finding -> canonical label (None: dropped)
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation",
    "Edema": "Edema", "Effusion": "Pleural Effusion", "Infiltration": "Lung Opacity", "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion", "Pleural_Thickening": "Pleural Other", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "No Finding": "No Finding", "Emphysema": None, "Fibrosis": None,
    "Hernia": None,
}


def test_nih_labels_splits_and_quarantine(built, default):
    facts, prep = built["nih"][1], default["nih"]
    m = prep.manifest.set_index("image_id")
    assert set(m.index) == {n.removesuffix(".png") for n in facts["usable"]}
    for name, f in facts["usable"].items():
        row = m.loc[name.removesuffix(".png")]
        positive = {NIH_EXPECTED[x] for x in f["findings"].split("|")} - {None}
        for label in CANONICAL_LABELS:
            expected = math.nan if label not in PROVIDED["nih"] else float(label in positive)
            assert _same(float(row[label]), expected), (name, label)
        assert row["patient_id"] == f["patient"]
        assert (row["split"] == "test") == (f["patient"] in facts["test_patients"])  # official, by patient
    assert m.loc[facts["moved"].removesuffix(".png"), "split"] == "test"
    q = prep.quarantine.set_index("source_path")
    assert "not found" in q.loc[facts["missing"], "reason"]


def test_nih_boxes_stretch_and_pad(built, default, tmp_path):
    root, facts = built["nih"]
    known = facts["known"].removesuffix(".png")
    assert facts["known_shape"] == (96, 128) and facts["known_box"] == (32.0, 24.0, 64.0, 48.0)
    stretch = default["nih"].boxes
    # 128 x 96 -> 64 x 64: x scales by 1/2, y by 2/3
    assert stretch[stretch["image_id"] == known][["label", "x", "y", "w", "h"]].values.tolist() == [
        ["Cardiomegaly", 16, 16, 32, 32]]
    pad = run(tmp_path, make_params("nih", root, fit="pad")).boxes
    # pad: one scale (1/2), the 48 px high film centred with 8 px black above and below
    assert pad[pad["image_id"] == known][["label", "x", "y", "w", "h"]].values.tolist() == [
        ["Cardiomegaly", 16, 20, 32, 24]]
    # box labels map like findings (the box file's "Infiltrate" -> Lung Opacity)
    nih_labels = {b[0] for f in facts["images"].values() for b in f.get("boxes", [])}
    assert set(stretch["label"]) == {NIH_EXPECTED.get(x, "Lung Opacity") for x in nih_labels}


@pytest.mark.parametrize("commas", ["none", "rows only"])
def test_nih_other_csv_copies_and_no_split_lists(commas, tmp_path):
    from tests.fixtures import nih

    facts = nih.build(tmp_path / "ds", trailing_comma=commas != "none")
    if commas == "rows only":  # a copy whose header lost its trailing comma but whose rows kept theirs
        entry = tmp_path / "ds" / "Data_Entry_2017.csv"
        head, rest = entry.read_text().split("\n", 1)
        entry.write_text(head.rstrip(",") + "\n" + rest)
    (tmp_path / "ds" / "test_list.txt").unlink()
    prep = run(tmp_path, make_params("nih", tmp_path / "ds"))
    m = prep.manifest
    assert len(m) == facts["n_images"] and set(m["split"]) == {"train", "val", "test"}
    assert m.set_index("image_id").loc["00000001_000", "No Finding"] == 1.0
    assert np.isnan(m["Fracture"]).all()
