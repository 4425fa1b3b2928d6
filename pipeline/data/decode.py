"""One safe decoder for PNG, JPEG and DICOM: file -> float32 (H, W) in [0, 1], 0 = black (air).

Every source and the viewer decode through here, so an image means the same thing everywhere.
Anything that cannot be used raises DecodeError with a one-line reason that names no patient and no
path (sources quarantine the file and go on; the viewer answers 4xx). Untrusted input is assumed:

- size is checked before pixels are decoded: bytes against `max_bytes`, header dimensions against
  `max_pixels` (PIL's own decompression-bomb warning is an error here, its limit still applies);
- truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES is left alone, i.e. off);
- every exception from PIL, pydicom, its pixel plugins or numpy, MemoryError and a Rust plugin's
  panic included, becomes a DecodeError naming only the exception type; no traceback or library
  message (which may quote a path or a header value) gets out;
- warnings and pydicom's log output are silenced while decoding: pydicom's value-validation
  messages quote header values such as PatientName.

Rasters (PNG, JPEG; also GIF, TIFF, BMP, WebP, which mask datasets ship): EXIF orientation is
applied; colour becomes ITU-R 601 luma; alpha is composited on black (transparent = air), so a
cut-out film does not turn its background white; animated or multi-page files give their first
frame (info["animated"] says so). 16-bit samples are divided by 2**b - 1 with b the smallest of
8/10/12/14/16 bits that holds the brightest sample, because 12-bit detector data is commonly stored
unscaled in 16-bit PNGs (dividing by 65535 would give a black film, by 255 would clip it).

DICOM (pipeline.data.dicom): modality LUT, VOI LUT or first window, min-max, MONOCHROME1
inverted; compressed frames are checked against the header before a plugin decodes them.

Process-global state (the warnings filters, pydicom's validation mode and logger) is switched
only under one lock (dicom.quiet_pydicom), so decodes are serialised within a process; decode in
processes to go parallel.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_BYTES = 512 * 2**20  # an uncompressed 16-bit 60-Mpixel DICOM is 120 MB
RASTER_FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP")  # JPEG covers MPO; no EPS (Ghostscript) etc.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class DecodeError(ValueError):
    """The file cannot be used. The message is one line and safe to store (no identifiers, no paths)."""


class NotDicom(Exception):
    """Raised by a forced read that found no DICOM image: the caller reports 'not an image'."""


@dataclass
class Decoded:
    pixels: np.ndarray                  # float32 (H, W) in [0, 1]; 0 = black (air), as a reader sees it
    format: str                         # "png" | "jpeg" | "dicom" (or "gif", "tiff", "bmp", "webp")
    view: str | None = None             # "PA", "AP", "LL", ... from DICOM ViewPosition when present
    patient_hash: str | None = None     # salted hash of a DICOM PatientID; the ID itself is never kept
    info: dict = field(default_factory=dict)  # non-identifying: original size, bit depth, photometric


def salted_hash(value: str, salt: str, n: int = 16) -> str:
    """A stable pseudonym: the first `n` hex digits of sha256(salt + value)."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:n]


def decode(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
           id_salt: str = "", max_bytes: int = DEFAULT_MAX_BYTES) -> Decoded:
    """Decode PNG, JPEG or DICOM (by content, not by name) into a grayscale float image."""
    data = _read(source, max_bytes)
    if not data:
        raise DecodeError("empty file")
    from pipeline.data.dicom import decode_dicom, quiet_pydicom

    try:
        with quiet_pydicom():
            if len(data) >= 132 and data[128:132] == b"DICM":
                return decode_dicom(data, max_pixels, id_salt, force=False)
            return _decode_raster_or_raw_dicom(data, max_pixels, id_salt)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("out of memory while decoding") from None
    except Exception as err:  # noqa: BLE001 - libraries raise anything on hostile input
        raise DecodeError(f"unreadable image ({type(err).__name__})") from None
    except BaseException as err:  # a Rust plugin's panic (pyo3's PanicException) is no Exception
        if type(err).__name__ != "PanicException":
            raise
        raise DecodeError("unreadable image (PanicException)") from None


def _read(source: str | os.PathLike | bytes, max_bytes: int) -> bytes:
    """The file's bytes, never more than max_bytes + 1 read (a FIFO or /dev/zero cannot hang us)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            with Path(source).open("rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError as err:
            raise DecodeError(f"cannot read file: {err.strerror or type(err).__name__}") from None
    if len(data) > max_bytes:
        raise DecodeError(f"file exceeds the limit of {max_bytes} bytes")
    return data


def check_pixels(width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    if width * height * max(frames, 1) > max_pixels:
        extra = f"x{frames} frames" if frames > 1 else ""
        raise DecodeError(f"{width}x{height}{extra} pixels exceed the limit of {max_pixels}")


# ---------------------------------------------------------------------------------------- rasters

def _decode_raster_or_raw_dicom(data: bytes, max_pixels: int, id_salt: str) -> Decoded:
    from PIL import UnidentifiedImageError

    from pipeline.data.dicom import decode_dicom

    try:
        return _decode_raster(data, max_pixels)
    except UnidentifiedImageError:
        pass
    try:  # a DICOM dataset without preamble: accepted only when it holds pixel data
        return decode_dicom(data, max_pixels, id_salt, force=True)
    except NotDicom:
        raise DecodeError("not a PNG, JPEG or DICOM image") from None


def _decode_raster(data: bytes, max_pixels: int) -> Decoded:
    """Raises UnidentifiedImageError (for the DICOM fallback) when no allowed format matches."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():  # PIL's bomb warning is an error here, and only here
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
        except UnidentifiedImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise DecodeError(f"image dimensions exceed PIL's limit of {Image.MAX_IMAGE_PIXELS} pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:  # a known signature, then garbage
            raise DecodeError(f"truncated or corrupt image header ({type(err).__name__})") from None
        with im:
            fmt = (im.format or "").lower()
            check_pixels(im.width, im.height, max_pixels)
            info = {"width": im.width, "height": im.height, "mode": im.mode}
            if getattr(im, "is_animated", False):
                info["animated"] = True
                im.seek(0)
            try:
                im.load()
            except OSError as err:  # not LOAD_TRUNCATED_IMAGES: a short file is an error
                raise DecodeError(f"truncated or corrupt {fmt.upper()} image ({type(err).__name__})") from None
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception as err:  # noqa: BLE001 - a film of unknown orientation is not used
                raise DecodeError(f"unreadable EXIF orientation ({type(err).__name__})") from None
            arr = _gray(upright)
        info["width"], info["height"] = arr.shape[1], arr.shape[0]  # as displayed, after EXIF rotation
    if not np.isfinite(arr).all():
        raise DecodeError("image has non-finite pixel values")
    return Decoded(arr, "jpeg" if fmt in ("jpeg", "mpo") else fmt, info=info)


def _gray(im) -> np.ndarray:
    """Any PIL mode -> float32 (H, W) in [0, 1]."""
    mode = im.mode
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if mode.startswith("I") or mode == "F":
        return _scale_high_depth(np.asarray(im))
    if mode in ("P", "PA"):
        im = im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    elif mode in ("La", "RGBa"):  # premultiplied: back to straight alpha, composited below
        im = im.convert(mode.upper())
    elif mode not in ("LA", "RGB", "RGBA", "RGBX"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    gray = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if im.mode in ("LA", "RGBA"):
        gray *= np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0  # composite on black
    return gray


def _scale_high_depth(a: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float samples -> [0, 1]: non-negative integers up to 16 bits by the
    smallest bit depth that holds them, floats already in [0, 1] as they are, anything else by its
    own range."""
    integral = a.dtype.kind in "iu"
    a = a.astype(np.float32)
    if a.size == 0:
        return a
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DecodeError("image has non-finite pixel values")
    if integral and lo >= 0 and hi <= 65535:
        bits = next(b for b in (8, 10, 12, 14, 16) if hi < 2**b)
        return a / float(2**bits - 1)
    if not integral and lo >= 0 and hi <= 1:
        return a
    return min_max(a)


def min_max(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DecodeError("pixel values are not finite")
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)
