"""Awkward and hostile files inside a real dataset's layout, through `prepare`: the usable ones become
the right images, the rest become quarantine rows with the right reason, and nothing crashes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Paths
from pipeline.data.prepare import prepare
from pipeline.data.sources.common import id_salt, pseudonym
from pipeline.data.store import ArrayStore
from tests.fixtures import bad_files as bf
from tests.fixtures import kermany, rsna
from tests.fixtures.images import radiograph, write_dicom
from tests.test_sources import make_params


def _prepared(project: Path):
    paths = Paths(project)
    manifest = pd.read_parquet(paths.manifest)
    images = ArrayStore(paths.images)
    quarantine = pd.read_csv(paths.quarantine)
    return manifest, images, quarantine


def _image(manifest: pd.DataFrame, images: ArrayStore, image_id: str) -> np.ndarray:
    row = np.flatnonzero(manifest["image_id"].to_numpy() == image_id)
    assert len(row) == 1, f"{image_id} not prepared"
    return images[int(row[0])]


def test_raster_twins_and_hostile_files_in_a_kermany_tree(tmp_path):
    root = tmp_path / "kermany"
    kermany.build(root)
    folder = root / "chest_xray" / "train" / "NORMAL"
    film = radiograph(np.random.default_rng(7), (150, 120))
    wide = (film.astype(np.uint16) * 257)                      # the same film as a 16-bit PNG
    (folder / "IM-9001-0001.png").write_bytes(bf.raster_bytes(film, "PNG"))
    (folder / "IM-9002-0001.png").write_bytes(bf.raster_bytes(wide, "PNG"))
    (folder / "IM-9003-0001.png").write_bytes(bf.raster_bytes(film, "PNG", mode="RGBA"))
    (folder / "IM-9004-0001.jpeg").write_bytes(bf.truncated(bf.raster_bytes(film, "JPEG")))
    (folder / "IM-9005-0001.png").write_bytes(bf.png_bomb())
    (folder / "IM-9006-0001.jpeg").write_bytes(bf.random_bytes())
    (folder / "IM-9007-0001.jpeg").write_bytes(bf.empty())

    prepare(make_params("kermany", root, section={"kermany": {"resplit_val": True}}), Paths(tmp_path / "p"))
    manifest, images, quarantine = _prepared(tmp_path / "p")
    ref = _image(manifest, images, "train/NORMAL/IM-9001-0001")
    np.testing.assert_array_equal(_image(manifest, images, "train/NORMAL/IM-9002-0001"), ref)
    np.testing.assert_array_equal(_image(manifest, images, "train/NORMAL/IM-9003-0001"), ref)
    assert ref.std() > 10  # a real film, not a blank

    reasons = dict(zip(quarantine["source_path"].map(lambda p: Path(p).stem), quarantine["reason"]))
    assert "IM-9004-0001" in reasons and "IM-9006-0001" in reasons and "IM-9007-0001" in reasons
    assert "exceed" in reasons["IM-9005-0001"]
    assert not {"IM-9004-0001", "IM-9005-0001", "IM-9006-0001", "IM-9007-0001"} & {
        Path(i).name for i in manifest["image_id"]}
    assert all("\n" not in r and str(root) not in r for r in quarantine["reason"])


def test_monochrome_twins_and_broken_dicoms_in_an_rsna_tree(tmp_path):
    root = tmp_path / "rsna"
    rsna.build(root)
    film = radiograph(np.random.default_rng(3), 128)
    extra = {
        "twin-mono2": lambda p: write_dicom(p, film, patient_id="twin-mono2"),
        "twin-mono1": lambda p: write_dicom(p, film, patient_id="twin-mono1", monochrome1=True),
        "several": lambda p: p.write_bytes(bf.multiframe_dicom()),
        "headeronly": lambda p: p.write_bytes(bf.dicom_without_pixels()),
        "huge": lambda p: p.write_bytes(bf.dicom_bomb()),
        "cut-short": lambda p: p.write_bytes(bf.truncated(p.read_bytes()) if p.exists() else b""),
    }
    for pid, write in extra.items():
        path = root / "stage_2_train_images" / f"{pid}.dcm"
        if pid == "cut-short":
            write_dicom(path, film, patient_id=pid)
        write(path)
        with open(root / "stage_2_train_labels.csv", "a") as fh:
            fh.write(f"{pid},,,,,0\n")
        with open(root / "stage_2_detailed_class_info.csv", "a") as fh:
            fh.write(f"{pid},Normal\n")

    project = tmp_path / "p"
    prepare(make_params("rsna", root), Paths(project))
    manifest, images, quarantine = _prepared(project)
    salt = id_salt(project)
    np.testing.assert_array_equal(_image(manifest, images, pseudonym("twin-mono1", salt)),
                                  _image(manifest, images, pseudonym("twin-mono2", salt)))
    reasons = dict(zip(quarantine["source_path"], quarantine["reason"]))
    assert "multi-frame" in reasons[f"rsna/{pseudonym('several', salt)}"]
    assert "no pixel data" in reasons[f"rsna/{pseudonym('headeronly', salt)}"]
    assert "exceed the limit" in reasons[f"rsna/{pseudonym('huge', salt)}"]
    assert f"rsna/{pseudonym('cut-short', salt)}" in reasons
    for pid in extra:  # the file names are patient ids: never written
        assert pid not in quarantine.to_csv() and not manifest.astype(str).isin([pid]).any().any()
