"""Phantom films shipped with the viewer, with their ground truth, so a new user can click through
without data. `python -m pipeline.viewer.examples` regenerates them (deterministic).

Each example carries the planted shortcut markers as the training data does (agreeing with the
label), so cycle 0's heatmap on the marker and the refined model's on the anatomy can be compared.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "example_films"
SIZE = 256
SPECS = [  # (file, findings, seed)
    ("phantom_cardiomegaly.png", {"Cardiomegaly": True}, 11),
    ("phantom_pneumonia.png", {"Pneumonia": True}, 12),
    ("phantom_effusion_nodule.png", {"Pleural Effusion": True, "Lung Lesion": True}, 13),
    ("phantom_no_finding.png", {}, 14),
]
DICOM_EXAMPLE = "phantom_pneumonia.dcm"


@dataclass(frozen=True)
class Example:
    name: str
    path: Path
    truth: dict[str, bool]

    @property
    def title(self) -> str:
        pos = [k for k, v in self.truth.items() if v]
        return f"{self.name} — truth: {', '.join(pos) if pos else 'no finding'}"


def examples() -> list[Example]:
    truth = json.loads((HERE / "truth.json").read_text())
    return [Example(name, HERE / name, truth[name]) for name in sorted(truth) if (HERE / name).is_file()]


def generate() -> None:
    from PIL import Image

    from pipeline.data import phantom

    truth = {}
    for name, findings, seed in SPECS:
        rng = np.random.default_rng(seed)
        f = {lab: bool(findings.get(lab, False)) for lab in phantom.PHANTOM_LABELS}
        markers = {lab: f[lab] for lab in phantom.SHORTCUT_MARKERS}
        img = phantom.render(rng, SIZE, phantom.sample_patient(rng), f, markers).image
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", optimize=True)
        (HERE / name).write_bytes(buf.getvalue())
        truth[name] = f
        if name == "phantom_pneumonia.png":
            _write_dicom(HERE / DICOM_EXAMPLE, img)
            truth[DICOM_EXAMPLE] = f
    (HERE / "truth.json").write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")


def _write_dicom(path: Path, img: np.ndarray) -> None:
    """MONOCHROME1 (inverted) 8-bit DICOM with made-up identifiers: the viewer must show none of them."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = "PHANTOM-0001", "PHANTOM^EXAMPLE"
    ds.Modality, ds.ViewPosition = "CR", "PA"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (255 - img).astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())


if __name__ == "__main__":
    generate()
