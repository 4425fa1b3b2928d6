"""Decompression bombs: huge dimensions in tiny files, and compressed data that inflates a
thousandfold, in every format the decoder reads (tests/test_fuzz_bombs.py, tests/test_fuzz_http.py).
"""
from __future__ import annotations

import functools
import io
import struct
import time
import zlib

import numpy as np

from tests.fixtures import bad_files as bf
from tests.fuzz_mutations import png_build, png_chunks
from tests.fuzz_seeds import _deflated_meta, _meta_end, zeros_deflate


def _tiff_with_size(width: int, height: int) -> bytes:
    """A small TIFF whose ImageWidth/ImageLength tags claim width x height (LONG values)."""
    d = bytearray(bf.raster_bytes(np.zeros((8, 8), np.uint8), "TIFF"))
    assert d[:4] == b"II*\0"
    ifd = struct.unpack("<I", d[4:8])[0]
    for k in range(struct.unpack("<H", d[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * k
        tag = struct.unpack("<H", d[at:at + 2])[0]
        if tag in (256, 257):
            d[at + 2:at + 12] = struct.pack("<HII", 4, 1, width if tag == 256 else height)
    return bytes(d)


def _gif_with_size(width: int, height: int) -> bytes:
    d = bytearray(bf.raster_bytes(np.zeros((8, 8), np.uint8), "GIF"))
    d[6:10] = struct.pack("<HH", width, height)
    at = d.find(b"\x2c", 13)  # image descriptor
    d[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(d)


def _jpeg_with_size(height: int, width: int, components: int | None = None, dicom: bool = False) -> bytes:
    img = np.zeros((16, 16), np.uint8)
    d = bytearray(bf.dicom_bytes(img, syntax="jpeg") if dicom else bf.raster_bytes(img, "JPEG"))
    at = d.find(b"\xff\xc0")
    d[at + 5:at + 9] = struct.pack(">HH", height, width)
    if components is not None:
        d[at + 9] = components
    return bytes(d)


def _j2k_dicom(side: int, components: int = 1) -> bytes:
    """A 64 x 64 JPEG 2000 DICOM whose codestream's SIZ claims side x side pixels (one tile) and
    `components` components (the DICOM header still says 64 x 64, one sample)."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    img = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(bf.dicom_bytes(img, syntax="jpeg2000", bits_stored=12)))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    lsiz, rsiz = struct.unpack(">HH", frame[4:8])
    comp = frame[42:45]
    siz = struct.pack(">HHIIIIIIIIH", 38 + 3 * components, rsiz, side, side, 0, 0, side, side, 0, 0,
                      components) + comp * components
    ds.PixelData = encapsulate([frame[:4] + siz + frame[4 + lsiz:]])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _deflated_dicom_bomb(inflated: int = 1 << 30) -> bytes:
    """A 1 MB deflated DICOM whose dataset inflates to 1 GiB: an 8 x 8 image, then a private OB
    element of zeros."""
    plain = bf.dicom_bytes(np.zeros((8, 8), np.uint8))
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = plain[_meta_end(plain):] + struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, inflated)
    start = co.compress(body) + co.flush(zlib.Z_FULL_FLUSH)
    return _deflated_meta() + start + zeros_deflate(inflated)


def _png_zlib_bomb(width: int, height: int, inflated: int = 1 << 30) -> bytes:
    """A PNG whose IDAT inflates to 1 GiB (zlib framing around the raw zeros stream)."""
    adler = (inflated % 65521) << 16 | 1  # Adler-32 of n zeros: A = 1, B = n * A mod 65521
    stream = b"\x78\xda" + zeros_deflate(inflated) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return png_build([[b"IHDR", ihdr], [b"IDAT", stream], [b"IEND", b""]])


def _png_text_bomb(kind: bytes) -> bytes:
    """A valid 8 x 8 PNG with a zTXt or iCCP chunk that inflates to 1 GiB before its image data."""
    chunks = png_chunks(bf.raster_bytes(np.zeros((8, 8), np.uint8)))
    stream = b"\x78\xda" + zeros_deflate(1 << 30) + b"\0\0\0\0"
    chunks.insert(1, [kind, b"bomb\0\0" + stream])
    return png_build(chunks)


@functools.lru_cache(maxsize=None)
def bombs() -> dict[str, bytes]:
    """Huge dimensions in tiny files, and compressed data that inflates a thousandfold; each must be
    refused (the two marked 'small image' may also decode, being small) in under BOMB_SECONDS."""
    return {
        "png 100000x100000 IHDR": bf.png_bomb(),
        "png 2^31-1 square IHDR": png_build([[b"IHDR", struct.pack(">IIBBBBB", 2**31 - 1, 2**31 - 1, 8, 0, 0, 0, 0)],
                                             [b"IDAT", zlib.compress(bytes(4096))], [b"IEND", b""]]),
        "png 9000x9000 IHDR (over max_pixels, under PIL's limit)": bf.png_bomb(9000, 9000),
        "png zlib bomb, 1 GiB IDAT, 100000x100000 IHDR": _png_zlib_bomb(100_000, 100_000),
        "png zlib bomb, 1 GiB IDAT, small image": _png_zlib_bomb(64, 64),
        "png zTXt chunk inflating to 1 GiB, small image": _png_text_bomb(b"zTXt"),
        "png iCCP chunk inflating to 1 GiB": _png_text_bomb(b"iCCP"),
        "jpeg SOF 65535x65535": _jpeg_with_size(65535, 65535),
        "jpeg SOF 65500x65500": _jpeg_with_size(65500, 65500),
        "jpeg SOF 9000x9000": _jpeg_with_size(9000, 9000),
        "tiff 100000x100000": _tiff_with_size(100_000, 100_000),
        "gif 65535x65535": _gif_with_size(65535, 65535),
        "dicom RLE 65535x65535": bf.dicom_bomb(),
        "dicom native 65535x65535": bf.dicom_bomb(syntax=None),
        "dicom RLE 7000x7000": bf.dicom_bomb(7000, 7000),
        "dicom 2,000,000 frames": bf.multiframe_bomb(),
        "dicom deflated dataset inflating to 1 GiB": _deflated_dicom_bomb(),
        "dicom 16x16 with a 13000x13000 JPEG frame": _jpeg_with_size(13000, 13000, dicom=True),
        "dicom 16x16 with a 3-component 9000x9000 JPEG frame": _jpeg_with_size(9000, 9000, 3, dicom=True),
        "dicom 64x64 with a 30000x30000 JPEG 2000 frame": _j2k_dicom(30000),
        "dicom 64x64 with a 9000x9000 JPEG 2000 frame": _j2k_dicom(9000),
        "dicom 64x64 with a 16384-component JPEG 2000 frame": _j2k_dicom(64, 16384),
    }


def _may_decode(name: str) -> bool:
    return "small image" in name


def _timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall time of `repeats` calls (ms; the machine is shared, so one slow run is noise) and
    the last outcome: the exception raised or the value returned."""
    times, outcome = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        try:
            outcome = fn()
        except Exception as err:  # noqa: BLE001 - the outcome is checked by the caller
            outcome = err
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)), outcome
