"""No PHI (README "Reliability"): patient identifiers in DICOM headers never reach logs, reports, manifests,
stores, responses or the viewer's temp dir.

Two paths carry DICOMs: uploads to the viewer (`POST /api/v1/predict`, 100 files here, each with its
own name, IDs, dates, institution, UIDs and an identifying file name, some malformed or broken) and
the prepare stage over a DICOM dataset (RSNA's layout, where the file name is the patientId too). Each
run draws a random token into every identifier, so a hit can only be a leak of this run's values.

Searched, byte for byte and case-insensitively: every response body (heatmap PNGs decoded), the
server's log, every file in the viewer's temp dir and every file the run created or changed in the
project and the repository; for prepare, every file it wrote (the manifest's and boxes' columns also
decoded, since parquet compresses strings) and its stdout/stderr.
"""
from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, tiny_params
from tests.fixtures import bad_files as bf
from tests.reliability import record

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

N_UPLOADS = 100
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", ".pytest_cache", ".hypothesis"}


def identifiers(token: str, k: int) -> dict[str, str]:
    """The identifying header values of file k; every one carries the run's token or is unique to k."""
    return {
        "PatientName": f"Doe{token}^Jane{k:03d}^PHI",
        "PatientID": f"MRN-{token}-{98765 + k}",
        "AccessionNumber": f"ACC{token}{k:04d}",
        "PatientBirthDate": f"19{40 + k % 50:02d}{1 + k % 12:02d}{1 + k % 28:02d}",
        "InstitutionName": f"St Elsewhere {token} Hospital",
        "ReferringPhysicianName": f"House{token}^Gregory",
        "OtherPatientIDs": f"OPID{token}{k:04d}",
        "PatientAddress": f"{k} Privet Drive {token}",
        "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{int(token, 36)}.{k}",
        "StudyID": f"S{token}{k}",
    }


def variants(ids: dict[str, str], token: str, k: int) -> tuple[set[str], set[str]]:
    """(unique, loose): values that can only come from this run (safe to search anywhere), and the
    shorter spellings (name parts, bare numbers, the birth date) searched where only this run writes."""
    unique = set(ids.values()) - {ids["PatientBirthDate"]}
    family, given, _ = ids["PatientName"].split("^")
    unique |= {family, f"{family}^{given}", f"{given} {family}", f"{family}, {given}", f"MRN-{token}",
               f"{token}-{98765 + k}", f"House{token}", f"OPID{token}", f"ACC{token}"}
    loose = {given, "Jane", ids["PatientBirthDate"], "Privet Drive", "Gregory", "St Elsewhere"}
    return {u.lower() for u in unique}, {v.lower() for v in loose}


def _dicom(img: np.ndarray, ids: dict[str, str], **extra) -> bytes:
    tags = {k: v for k, v in ids.items() if k not in ("PatientName", "PatientID")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bf.dicom_bytes(img, patient_id=ids["PatientID"], patient_name=ids["PatientName"],
                              PatientSex="F", PatientAge="045Y", **{**tags, **extra})


def _hits(data: bytes, needles: set[str]) -> list[str]:
    low = data.lower()
    return sorted(n for n in needles if n.encode() in low)


def _files(top: Path, since: float | None = None):
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file() and (since is None or st.st_mtime >= since) and st.st_size < 64 * 1024 * 1024:
                yield path


def _strip_images(obj):
    """The JSON with every base64 PNG taken out (returned separately) and numbers zeroed: random
    base64 text, or a float's digits, may spell a short value by chance; images are decoded and
    searched as bytes instead, and numbers are the model's outputs, not header values."""
    images: list[bytes] = []

    def walk(o):
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if k.endswith("_png") and isinstance(v, str):
                    images.append(base64.b64decode(v))
                    out[k] = ""
                else:
                    out[k] = walk(v)
            return out
        if isinstance(o, list):
            return [walk(v) for v in o]
        return 0 if isinstance(o, (int, float)) and not isinstance(o, bool) else o
    return walk(obj), images


# -- 100 uploads to the viewer ---------------------------------------------------------------------

def test_100_dicom_uploads_leave_no_identifier_anywhere():
    from PIL import Image

    from tests.viewer_support import film, running_viewer

    viewer = running_viewer()
    token = secrets.token_hex(3).upper()
    start = time.time() - 1
    temp_before = {p for p in viewer.temp_dir.rglob("*") if p.is_file()}
    films = [film(96, seed=s) for s in range(4)]
    unique, loose = set(), set()
    texts: list[bytes] = []      # response text without images, searched for every spelling
    images: list[bytes] = []     # decoded PNGs, searched for the unique values
    expected, got = [], []
    t0 = time.monotonic()
    for k in range(N_UPLOADS):
        ids = identifiers(token, k)
        u, lo = variants(ids, token, k)
        unique |= u
        loose |= lo
        img = films[k % 4]
        kind = k % 10
        if kind == 6:
            data = _dicom(255 - img, ids, photometric="MONOCHROME1")
        elif kind == 7:   # values pydicom warns about (too long, malformed date), warnings that quote them
            ids_bad = {**ids, "PatientID": ids["PatientID"] + "-" + "9" * 70,
                       "PatientBirthDate": f"{ids['PatientBirthDate'][:4]}-{ids['PatientBirthDate'][4:6]}-xx"}
            unique.add(ids_bad["PatientID"].lower())
            data = _dicom(img, ids_bad)
        elif kind == 8:   # no pixel data: refused, with the identifiers in the header
            data = bf.dicom_without_pixels(patient_id=ids["PatientID"], patient_name=ids["PatientName"],
                                           AccessionNumber=ids["AccessionNumber"],
                                           InstitutionName=ids["InstitutionName"])
        elif kind == 9:   # truncated inside the pixel data
            data = bf.truncated(_dicom(img, ids), 0.7)
        else:
            data = _dicom(img, ids)
        name = f"{ids['PatientName'].replace('^', '_')}_{ids['PatientID']}_{ids['PatientBirthDate']}.dcm"
        if kind in (0, 8):  # control: the needles are spelt as the file carries them
            assert len(_hits(data, {ids["PatientName"].lower(), ids["PatientID"].lower()})) == 2
        r = httpx.post(viewer.url + "/api/v1/predict", files={"file": (name, data, "application/dicom")},
                       auth=viewer.auth, timeout=120)
        expected.append(422 if kind in (8, 9) else 200)
        got.append(r.status_code)
        body, pngs = _strip_images(r.json())
        texts.append(json.dumps(body).encode() + b"\n" + repr(dict(r.headers)).encode())
        images += pngs
    uploads_s = time.monotonic() - t0
    assert got == expected, [(k, g, e) for k, (g, e) in enumerate(zip(got, expected)) if g != e]
    everything = unique | loose
    leaks: dict[str, list[str]] = {}

    def search(place: str, data: bytes, needles: set[str]) -> None:
        hit = _hits(data, needles)
        if hit:
            leaks[place] = hit[:5]

    for i, t in enumerate(texts):
        search(f"response {i}", t, everything)
    for i, png in enumerate(images):
        search(f"response image {i}", png, unique)
        info = Image.open(io.BytesIO(png)).info
        search(f"response image {i} metadata", repr(info).encode(), everything)
    time.sleep(0.5)  # the log is flushed per line; let the last lines land
    log = viewer.log.read_bytes()
    search("viewer log", log, everything)
    temp_files = [p for p in viewer.temp_dir.rglob("*") if p.is_file()]
    for p in temp_files:
        search(str(p), p.read_bytes(), everything)
    # anything the viewer (or anyone, meanwhile) created or changed in the served project, the
    # viewer's tmp area and the repository it runs from
    changed = []
    for top, needles in ((viewer.root, everything), (viewer.log.parent, everything), (ROOT, unique)):
        for p in _files(top, since=start):
            if p == viewer.log:
                continue
            changed.append(p)
            try:
                search(str(p), p.read_bytes(), needles)
            except OSError:
                pass
    assert leaks == {}, leaks
    assert {p for p in viewer.temp_dir.rglob("*") if p.is_file()} == temp_before  # the REST API writes nothing
    assert b"predict: dicom image analysed" in log   # the log was the live one
    record("phi.viewer_uploads", uploads=N_UPLOADS, accepted=got.count(200), refused=got.count(422),
           identifiers_per_upload=len(identifiers(token, 0)) + 1, needles=len(everything), leaks=0,
           places_searched=len(texts) + len(images) + 1 + len(temp_files) + len(changed),
           log_bytes=len(log), temp_files=len(temp_files), files_changed_during_run=len(changed),
           uploads_s=round(uploads_s, 1))


# -- the prepare stage over a DICOM dataset ------------------------------------------------------

def build_rsna_with_phi(root: Path, token: str, n: int = 32) -> dict:
    """RSNA's layout (labels CSV with boxes, class CSV, stage_2_train_images/<patientId>.dcm) with every
    identifying header set; two films per patient; five broken files and one missing file."""
    from tests.fixtures import rsna
    from tests.fixtures.images import radiograph

    rng = np.random.default_rng(7)
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    labels, classes, unique, loose, broken, headers = [], [], set(), set(), {}, {}
    pids = []
    for k in range(n + 6):
        pid = str(uuid.uuid4())              # RSNA's patientId: the file name, and listed in the CSVs
        pids.append(pid)
        ids = identifiers(token, k // 2)     # two films per patient (same name and MRN)
        ids["AccessionNumber"] = f"ACC{token}{k:04d}"
        ids["StudyInstanceUID"] = f"1.2.826.0.1.3680043.8.498.{int(token, 36)}.{k}"
        u, lo = variants(ids, token, k // 2)
        unique |= u | {pid.lower(), ids["AccessionNumber"].lower(), ids["StudyInstanceUID"].lower()}
        loose |= lo
        positive = k % 2 == 0
        img = radiograph(rng, 96, {"Pneumonia": positive})
        extra = {"ViewPosition": "PA" if k % 3 else "AP"}
        if k == 3:   # values pydicom warns about (and its warnings quote them)
            ids = {**ids, "PatientID": ids["PatientID"] + "-" + "7" * 70, "PatientBirthDate": "1965-03-xx"}
            unique.add(ids["PatientID"].lower())
        data = _dicom(img, ids, **extra)
        if k < n:
            headers[pid] = {ids[t].lower() for t in ("PatientName", "PatientID", "AccessionNumber",
                                                     "InstitutionName", "StudyInstanceUID", "PatientBirthDate")}
        if k >= n:   # the broken ones, identifiers intact in their headers
            kind = ("truncated", "no pixel data", "too many pixels", "garbage after header", "empty", "missing")[k - n]
            broken[pid] = kind
            if kind == "truncated":
                data = data[: len(data) - 700]
            elif kind == "no pixel data":
                data = bf.dicom_without_pixels(patient_id=ids["PatientID"], patient_name=ids["PatientName"],
                                               AccessionNumber=ids["AccessionNumber"])
            elif kind == "too many pixels":
                import pydicom

                ds = pydicom.dcmread(io.BytesIO(data))
                ds.Rows = ds.Columns = 40000
                out = io.BytesIO()
                ds.save_as(out, enforce_file_format=True)
                data = out.getvalue()
            elif kind == "garbage after header":
                data = data[: len(data) - img.size] + os.urandom(17)
            elif kind == "empty":
                data = b""
        if broken.get(pid) != "missing":
            (images / f"{pid}.dcm").write_bytes(data)
        if positive:
            labels.append([pid, "20.0", "24.0", "40.0", "36.0", "1"])
            classes.append([pid, "Lung Opacity"])
        else:
            labels.append([pid, "", "", "", "", "0"])
            classes.append([pid, "Normal" if k % 4 == 1 else "No Lung Opacity / Not Normal"])
    rsna.write_csvs(root, labels, classes)
    return {"unique": unique, "loose": loose, "broken": broken, "n_good": n, "pids": pids, "headers": headers}


def test_prepare_of_a_dicom_dataset_writes_and_logs_no_identifier(tmp_path):
    token = secrets.token_hex(3).upper()
    data_root = tmp_path / "rsna"
    facts = build_rsna_with_phi(data_root, token)
    project = tmp_path / "project"
    project.mkdir()
    params = tiny_params()
    params["data"].update(source="rsna", root=str(data_root))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "CXR_LOG_LEVEL": "DEBUG", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    env.pop("CXR_ID_SALT", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.stages.prepare", "--params", "params.yaml", "--root", "."],
                          cwd=project, env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    manifest = pd.read_parquet(project / "data" / "prepared" / "manifest.parquet")
    quarantine = pd.read_csv(project / "reports" / "quarantine.csv")
    assert len(manifest) == facts["n_good"], len(manifest)     # every good file was read...
    assert len(quarantine) == len(facts["broken"]), quarantine  # ...and every broken one quarantined
    assert quarantine["source_path"].str.fullmatch(r"rsna/[0-9a-f]+").all(), quarantine["source_path"].tolist()
    assert manifest["source_path"].str.fullmatch(r"rsna/[0-9a-f]+").all()

    everything = facts["unique"] | facts["loose"]
    # control: the same search finds each good file's identifiers in the file itself
    for pid, values in facts["headers"].items():
        data = (data_root / "stage_2_train_images" / f"{pid}.dcm").read_bytes()
        assert _hits(data, values) == sorted(values), pid
    leaks: dict[str, list[str]] = {}
    files, n_bytes = 0, 0
    for path in _files(project):
        data = path.read_bytes()
        files += 1
        n_bytes += len(data)
        # raw image shards: random pixels could spell a short word, so search them for the long values
        needles = facts["unique"] if path.suffix == ".npy" else everything
        hit = _hits(data, needles)
        if hit:
            leaks[str(path.relative_to(project))] = hit[:5]
    tables = {p.name: pd.read_parquet(p) for p in (project / "data" / "prepared").rglob("*.parquet")}
    assert {"manifest.parquet", "boxes.parquet"} <= set(tables)
    for name, frame in tables.items():   # parquet may compress its strings: search the decoded values
        text = frame.astype(str).to_csv(index=False).encode() + json.dumps(list(frame.columns)).encode()
        hit = _hits(text, everything)
        if hit:
            leaks[f"{name} (decoded)"] = hit[:5]
    for stream, data in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        hit = _hits(data, everything)
        if hit:
            leaks[f"prepare {stream}"] = hit[:5]
    assert leaks == {}, leaks
    assert b"quarantined" in proc.stderr  # the log did speak about the broken files
    record("phi.prepare", source="rsna", images=facts["n_good"], quarantined=len(quarantine),
           files_searched=files, bytes_searched=n_bytes, log_bytes=len(proc.stdout) + len(proc.stderr),
           needles=len(everything), leaks=0)
