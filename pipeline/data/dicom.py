"""DICOM -> grayscale float, for pipeline.data.decode (whose contract applies: DecodeError with a
safe one-line reason, sizes checked before pixels are decoded).

DICOM: modality LUT (RescaleSlope/Intercept), then the VOI LUT or the first WindowCenter/Width, then
min-max to [0, 1], then MONOCHROME1 inverted. Min-max because the output range of a VOI transform
(or of raw detector values when there is none) is not fixed by the standard: pydicom derives it
from BitsStored and the rescale, so only the relative values carry meaning. Compressed syntaxes
decode through pydicom's plugins (pillow, pylibjpeg-*, gdcm), which size their buffers by the
compressed frame's own header: a JPEG/JPEG-LS/JPEG 2000 frame must therefore describe the image the
DICOM header does (size, SamplesPerPixel components) before it is decoded; python-gdcm, which can
kill the process on inconsistent files, is used only where no other plugin is installed. A deflated
dataset is inflated here, to at most INFLATE_BYTES_PER_PIXEL * max_pixels + 1 MiB (pydicom would
inflate it whole). Multi-frame files are refused, colour (RGB, YBR, palette) becomes luma. Files
without the 128-byte preamble are recognised when no raster decoder accepts them and pydicom finds
pixel data in them.
"""
from __future__ import annotations

import io
import logging
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from pipeline.data.decode import LUMA, Decoded, DecodeError, NotDicom, check_pixels, min_max, salted_hash

INFLATE_BYTES_PER_PIXEL = 2  # a deflated DICOM dataset holds at most a 16-bit gray image of max_pixels
# (a bomb is refused after inflating that much: about 0.5 s at the default limit, a stream of zeros
# inflates at some 250 MB/s)
_DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_STATE_LOCK = threading.RLock()
# ViewPosition's defined terms for radiographs (PS3.3 C.8.11.5) and the spellings seen in the field; any other
# value is dropped, since a free-text tag can carry a name ("DOE JOHN") as easily as a view
VIEWS = frozenset({"PA", "AP", "LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO", "LAO", "RAO", "LPO",
                   "RPO", "AP SUPINE", "AP ERECT", "PA ERECT"})
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
                "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while DICOM headers are read: its value-validation warnings (also sent to its
    logger) may quote header values such as the PatientID. Warnings of any origin are ignored in the
    block, since pydicom attributes some to its caller. Holds the module lock (re-entrant), because
    the switched settings are process-global."""
    import pydicom.config

    with _STATE_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        settings, log = pydicom.config.settings, logging.getLogger("pydicom")
        saved_mode, saved_disabled, saved_level = settings.reading_validation_mode, log.disabled, log.level
        settings.reading_validation_mode, log.disabled = pydicom.config.IGNORE, True
        # `disabled` silences only the 'pydicom' logger itself; the level silences its children too
        # (pydicom.pixels.decoders.base logs every failed pixel plugin with a traceback)
        log.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            settings.reading_validation_mode, log.disabled = saved_mode, saved_disabled
            log.setLevel(saved_level)


def decode_dicom(data: bytes, max_pixels: int, id_salt: str, *, force: bool) -> Decoded:
    ds = _read_dataset(data, force, max_pixels)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if force:
            raise NotDicom
        raise DecodeError("DICOM has no pixel data")
    rows, cols = _int_tag(ds, "Rows"), _int_tag(ds, "Columns")
    frames = _int_tag(ds, "NumberOfFrames", 1)
    samples = _int_tag(ds, "SamplesPerPixel", 1)
    check_pixels(cols, rows, max_pixels, frames)
    if frames > 1:
        raise DecodeError(f"multi-frame DICOM ({frames} frames) is not supported")
    if samples not in (1, 3):
        raise DecodeError(f"DICOM with {samples} samples per pixel is not supported")

    syntax = _transfer_syntax(ds)
    decoder = _decoder(syntax)
    options = _frame_options(ds, syntax, decoder, rows, cols, samples)
    try:
        arr, meta = decoder.as_array(ds, index=0, **options)
    except (ValueError, OSError, EOFError, RuntimeError) as err:  # short or corrupt pixel data
        raise DecodeError(f"truncated or corrupt DICOM pixel data ({type(err).__name__})") from None
    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation", ""))
    arr = _dicom_gray(arr, ds, photometric)
    pid = str(ds.get("PatientID", "") or "").strip()
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    info = {"width": cols, "height": rows, "bits_stored": _int_tag(ds, "BitsStored", 0),
            "signed": bool(_int_tag(ds, "PixelRepresentation", 0)),
            "photometric": photometric if photometric in _PHOTOMETRIC else "other",
            "transfer_syntax": _syntax_name(syntax)}
    return Decoded(arr, "dicom", view=view if view in VIEWS else None,
                   patient_hash=salted_hash(pid, id_salt) if pid else None, info=info)


def _read_dataset(data: bytes, force: bool, max_pixels: int):
    import pydicom
    from pydicom.uid import UID

    try:
        ds = _read_deflated(data, force, max_pixels) if _DEFLATED in data else None
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure
        if force:
            raise NotDicom from None
        raise DecodeError(f"unreadable DICOM ({type(err).__name__})") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        # a raw dataset (or a meta without it): name the encoding pydicom read, to choose the pixel decoder
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            if force:
                raise NotDicom
            raise DecodeError("DICOM has no transfer syntax")
        ds.file_meta.TransferSyntaxUID = UID(
            "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    return ds


def _read_deflated(data: bytes, force: bool, max_pixels: int):
    """The dataset of a Deflated Explicit VR Little Endian file, inflated to at most
    INFLATE_BYTES_PER_PIXEL * max_pixels + 1 MiB; None when the file meta names another syntax.
    pydicom inflates such a dataset whole, so 1 MB of zeros would become 1 GB."""
    import zlib

    from pydicom.dataset import FileDataset
    from pydicom.filebase import DicomBytesIO
    # the meta and command set are read by the (private) functions dcmread reads them with
    from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = DicomBytesIO(data)
    preamble = read_preamble(fp, force)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    command_set = _read_command_set_elements(fp)
    raw, limit, size = data[fp.tell():], INFLATE_BYTES_PER_PIXEL * max_pixels + 2**20, 0
    inflater, pending = zlib.decompressobj(-zlib.MAX_WBITS), raw
    while True:  # measure first, in 1 MiB steps keeping nothing: a bomb costs time, not memory
        step = len(inflater.decompress(pending, 2**20))
        pending, size = inflater.unconsumed_tail, size + step
        if size > limit:
            raise DecodeError(f"deflated DICOM dataset inflates beyond the limit of {limit} bytes")
        if step < 2**20:
            break
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    body = inflater.decompress(raw)
    if not inflater.eof:  # as pydicom's zlib.decompress, which refuses a cut stream
        raise DecodeError("truncated deflated DICOM dataset")
    dataset = read_dataset(DicomBytesIO(body), is_implicit_VR=False, is_little_endian=True)
    dataset.update(command_set)
    ds = FileDataset(DicomBytesIO(body), dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _frame_options(ds, syntax, decoder, rows: int, cols: int, samples: int) -> dict:
    """Check a compressed frame's own header against the DICOM header; pick the pixel plugin.

    The plugins size their buffers by the frame's header, so an 8x8 DICOM could carry a 30000x30000
    or a 16384-component frame (gigabytes from a file of 1 kB): size and components must match.
    python-gdcm kills the process (a C++ exception escaping its bindings, or a segfault) on some
    inconsistent files: a colour photometric over a one-component JPEG 2000, BitsAllocated 32 or a
    BitsStored unlike the JPEG's precision, a precision of 17. So another plugin is used wherever one
    is installed, and gdcm alone (JPEG Lossless, JPEG-LS) only after checks of what it assumes, and
    told the frame's own precision."""
    from pydicom import uid
    from pydicom.encaps import generate_frames

    plugins = decoder.available_plugins
    others = [p for p in ("pylibjpeg", "pillow", "pyjpegls", "pydicom") if p in plugins]
    options = {"decoding_plugin": others[0]} if "gdcm" in plugins and others else {}
    if syntax in uid.JPEG2000TransferSyntaxes:
        parse = _j2k_header
    elif syntax in uid.JPEGTransferSyntaxes or syntax in uid.JPEGLSTransferSyntaxes:
        parse = _jpeg_header
    else:
        return options
    header = parse(next(generate_frames(ds.PixelData, number_of_frames=1), b""))
    if header is None:
        raise DecodeError("unreadable compressed DICOM frame header")
    height, width, components, precision = header
    if (height, width, components) != (rows, cols, samples):
        raise DecodeError(f"compressed DICOM frame of {width}x{height}x{components} does not match "
                          f"its header ({cols}x{rows}x{samples})")
    if "gdcm" in plugins and not others:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        one_sample = photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
        if not 2 <= precision <= 16 or _int_tag(ds, "BitsAllocated") not in (8, 16) or one_sample != (samples == 1) \
                or photometric not in _PHOTOMETRIC:
            raise DecodeError(f"compressed DICOM frame of {precision}-bit precision does not fit its header "
                              "(BitsAllocated, PhotometricInterpretation)")
        options["bits_stored"] = precision
    return options


def _jpeg_header(b: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, components, precision) of the first JPEG or JPEG-LS frame header (SOFn), or None."""
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 10 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xF7:
            height, width = int.from_bytes(b[i + 5:i + 7], "big"), int.from_bytes(b[i + 7:i + 9], "big")
            return height, width, b[i + 9], b[i + 4]
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            return None
        else:
            i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    return None


def _j2k_header(b: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, components, precision of the first) from a JPEG 2000 codestream's SIZ (raw or
    in a JP2 box), or None."""
    i = 0
    if b[:8] == b"\0\0\0\x0cjP  ":  # JP2: walk the boxes to the codestream box
        i = 12
        while i + 8 <= len(b) and b[i + 4:i + 8] != b"jp2c":
            length = int.from_bytes(b[i:i + 4], "big")
            if length < 8:
                return None
            i += length
        i += 8
    if b[i:i + 4] != b"\xff\x4f\xff\x51" or len(b) < i + 43:
        return None
    x, y, x0, y0 = (int.from_bytes(b[i + k:i + k + 4], "big") for k in (8, 12, 16, 20))
    return y - y0, x - x0, int.from_bytes(b[i + 40:i + 42], "big"), (b[i + 42] & 0x7F) + 1


def _int_tag(ds, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise DecodeError(f"DICOM {keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM {keyword} is invalid") from None


def _transfer_syntax(ds):
    from pydicom.uid import UID

    uid = ds.file_meta.get("TransferSyntaxUID")
    if not uid:
        raise DecodeError("DICOM has no transfer syntax")
    return UID(str(uid))


def _syntax_name(uid) -> str:
    """The registered name, or the UID itself if it looks like one; never free text from the file."""
    if uid.is_valid and uid.name != str(uid):
        return uid.name
    return str(uid) if re.fullmatch(r"[0-9.]{1,64}", str(uid)) else "an unknown transfer syntax"


def _decoder(uid):
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DecodeError(f"no decoder for {_syntax_name(uid)}") from None
    if not decoder.is_available:
        raise DecodeError(f"no decoder for {_syntax_name(uid)} installed") from None
    return decoder


def _dicom_gray(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Stored values -> display values -> [0, 1], 0 = black."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:  # colour, already RGB (pydicom converts YBR): luma, no LUTs (they are for grayscale)
        return min_max(arr[..., :3].astype(np.float32) @ LUMA)
    if arr.ndim != 2:
        raise DecodeError(f"DICOM pixel array has shape {arr.shape}")
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds, index=0)  # VOI LUT sequence first, else the first window
    out = min_max(np.asarray(arr, dtype=np.float64))
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False)
