"""The valid seed files the fuzz tests mutate (every kind the decoder reads), and the DEFLATE
helpers that build deflated DICOMs and decompression bombs from them.
"""
from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.decode import decode
from tests.fixtures import bad_files as bf
from tests.fixtures.images import radiograph


@functools.lru_cache(maxsize=None)
def seed_files() -> dict[str, bytes]:
    """Small valid files of every kind the decoder reads (48 x 40 px, so a case costs milliseconds)."""
    film = radiograph(np.random.default_rng(11), (40, 48))
    f12 = film.astype(np.uint16) * 16                                  # 12-bit data in 16-bit samples
    signed = (film.astype(np.int16) * 8 - 1024).astype(np.int16)
    rgb = np.dstack([film, np.roll(film, 3, 1), 255 - film])
    phi = {"patient_id": bf.PHI_ID, "patient_name": bf.PHI_NAME}
    seeds = {
        "png_8bit": bf.raster_bytes(film),
        "png_16bit": bf.raster_bytes(f12),
        "png_rgba": bf.raster_bytes(film, mode="RGBA"),
        "png_palette": bf.raster_bytes(film, mode="P"),
        "jpeg_gray": bf.raster_bytes(film, "JPEG", quality=90),
        "jpeg_rgb": bf.raster_bytes(film, "JPEG", mode="RGB", quality=90),
        "jpeg_progressive": bf.raster_bytes(film, "JPEG", quality=90, progressive=True),
        "jpeg_exif": bf.exif_rotated_jpeg(film, orientation=6),
        "dicom_mono2": bf.dicom_bytes(film, **phi),
        "dicom_mono1_12bit": bf.dicom_bytes(4095 - f12, bits_stored=12, photometric="MONOCHROME1", **phi),
        "dicom_signed_window": bf.dicom_bytes(signed, RescaleSlope="1", RescaleIntercept="-1024",
                                              WindowCenter="40", WindowWidth="400", **phi),
        "dicom_rgb": bf.dicom_bytes(rgb, **phi),
        "dicom_raw": bf.dicom_bytes(film, preamble=False, **phi),
        "dicom_rle": bf.dicom_bytes(f12, bits_stored=12, syntax="rle", **phi),
        "dicom_jpeg": bf.dicom_bytes(film, syntax="jpeg", **phi),
        "dicom_j2k": bf.dicom_bytes(f12, bits_stored=12, syntax="jpeg2000", **phi),
        "gif_palette": bf.raster_bytes(film, "GIF"),
        "tiff_gray": bf.raster_bytes(film, "TIFF"),
    }
    seeds["dicom_deflated"] = to_deflated(seeds["dicom_mono2"])
    seeds["dicom_jpeg_lossless"] = gdcm_recode(seeds["dicom_mono1_12bit"], "JPEGLosslessProcess14_1")
    seeds["dicom_jpegls"] = gdcm_recode(seeds["dicom_mono2"], "JPEGLSLossless")
    for name, data in seeds.items():  # every seed is valid: what the mutations start from decodes
        d = decode(data)
        assert d.pixels.ndim == 2 and min(d.pixels.shape) >= 8, name
    return seeds


def gdcm_recode(data: bytes, syntax: str) -> bytes:
    """`data` re-encoded by python-gdcm in `syntax` (a gdcm.TransferSyntax name): JPEG Lossless and
    JPEG-LS, which only gdcm decodes here (pydicom writes neither)."""
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        src.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        return dst.read_bytes()


def _meta_end(data: bytes) -> int:
    """Offset of the dataset after the preamble and file meta of a DICOM written by pydicom."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return 144 + struct.unpack("<I", data[140:144])[0]


@functools.lru_cache(maxsize=None)
def _deflated_meta() -> bytes:
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(bf.dicom_bytes(np.zeros((8, 8), np.uint8))))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()[:_meta_end(out.getvalue())]


def _raw_deflate(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return co.compress(data) + co.flush()


def to_deflated(explicit: bytes) -> bytes:
    """An explicit VR little endian DICOM file (with preamble) as Deflated Explicit VR Little Endian."""
    return _deflated_meta() + _raw_deflate(explicit[_meta_end(explicit):])


def zeros_deflate(n_bytes: int) -> bytes:
    """A raw DEFLATE stream of n_bytes zeros (a multiple of 16 MiB) at zlib's best ratio (~1030:1), built
    from one compressed block repeated (a full flush byte-aligns it and clears the history)."""
    block = _zeros_block()
    assert n_bytes % (16 << 20) == 0
    return block * (n_bytes // (16 << 20)) + b"\x03\x00"  # + an empty final block


@functools.lru_cache(maxsize=None)
def _zeros_block() -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return co.compress(bytes(16 << 20)) + co.flush(zlib.Z_FULL_FLUSH)
