"""One safe decoder for PNG, JPEG and DICOM: file -> float32 (H, W) in [0, 1], 0 = black (air).

Every source and the viewer decode through here, so an image means the same thing everywhere.
Anything that cannot be used raises DecodeError with a one-line reason that names no patient
(sources quarantine the file and go on).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_MAX_PIXELS = 60_000_000


class DecodeError(ValueError):
    """The file cannot be used. The message is one line and safe to store (no identifiers, no paths)."""


@dataclass
class Decoded:
    pixels: np.ndarray                  # float32 (H, W) in [0, 1]; 0 = black (air), as a reader sees it
    format: str                         # "png" | "jpeg" | "dicom"
    view: str | None = None             # "PA", "AP", "LL", ... from DICOM ViewPosition when present
    patient_hash: str | None = None     # salted hash of a DICOM PatientID; the ID itself is never kept
    info: dict = field(default_factory=dict)  # non-identifying: original size, bit depth, photometric


def salted_hash(value: str, salt: str, n: int = 16) -> str:
    """A stable pseudonym: the first `n` hex digits of sha256(salt + value)."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:n]


def _read(source: str | os.PathLike | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as err:
        raise DecodeError(f"cannot read file: {err.strerror or type(err).__name__}") from None


def decode(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           id_salt: str = "") -> Decoded:
    """Decode PNG, JPEG or DICOM (by content, not by name) into a grayscale float image."""
    data = _read(source)
    if len(data) >= 132 and data[128:132] == b"DICM":
        return _decode_dicom(data, max_pixels, id_salt)
    return _decode_raster(data, max_pixels)


def _decode_raster(data: bytes, max_pixels: int) -> Decoded:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
            if im.width * im.height > max_pixels:
                raise DecodeError(f"{im.width}x{im.height} pixels exceed the limit of {max_pixels}")
            im = ImageOps.exif_transpose(im)
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, DecodeError):
            raise
        raise DecodeError(f"not a readable PNG/JPEG/DICOM image ({type(err).__name__})") from None
    return Decoded(arr, "jpeg" if fmt in ("jpeg", "mpo") else fmt, info={"width": arr.shape[1], "height": arr.shape[0]})


def _decode_dicom(data: bytes, max_pixels: int, id_salt: str) -> Decoded:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > max_pixels:
            raise DecodeError(f"{cols}x{rows} pixels exceed the limit of {max_pixels}")
        arr = ds.pixel_array.astype(np.float32)
    except DecodeError:
        raise
    except Exception as err:  # pydicom raises many types for broken files
        raise DecodeError(f"unreadable DICOM ({type(err).__name__})") from None
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = 1.0 - arr
    pid = ds.get("PatientID")
    return Decoded(arr, "dicom", view=str(ds.get("ViewPosition", "")) or None,
                   patient_hash=salted_hash(str(pid), id_salt) if pid else None,
                   info={"width": cols, "height": rows})
