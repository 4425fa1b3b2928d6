"""How a fuzz case is made from a seed (tests/fuzz_seeds.py), for hypothesis: bit flips, interesting
integers, inserts, deletions, truncations, duplicated and repeated ranges, splices of two seeds, and
format-aware changes that keep checksums and lengths valid so the parsers go deeper (PNG IHDR fields,
chunks and the inflated scanlines; JPEG SOF fields, segment lengths, scan data, EXIF orientation;
DICOM Rows, Columns, BitsAllocated, photometric, rescale and window values, the transfer syntax, the
Pixel Data length, the compressed frame's own header, palette and VOI LUTs). The field tables also
drive the deterministic one-field-at-a-time sweep (tests/test_fuzz_decoder.py).
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from hypothesis import strategies as st

from pipeline.data.dicom import quiet_pydicom
from tests.fixtures import bad_files as bf
from tests.fixtures.images import radiograph
from tests.fuzz_seeds import seed_files, to_deflated

# -------------------------------------------------------------------------------- byte mutations

INTERESTING = (0, 1, 2, 7, 8, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


def _pos(draw, n: int) -> int:
    """A position in [0, n], biased to the first 512 bytes, where the headers are."""
    if n <= 0:
        return 0
    return draw(st.one_of(st.integers(0, min(n, 512)), st.integers(0, n)))


def flip_bits(draw, d: bytes) -> bytes:
    if not d:
        return d
    b = bytearray(d)
    for _ in range(draw(st.integers(1, 8))):
        b[_pos(draw, len(b) - 1)] ^= 1 << draw(st.integers(0, 7))
    return bytes(b)


def set_integer(draw, d: bytes) -> bytes:
    width = draw(st.sampled_from((1, 2, 4)))
    if len(d) < width:
        return d
    value = draw(st.sampled_from(INTERESTING)) & ((1 << 8 * width) - 1)
    at = _pos(draw, len(d) - width)
    return d[:at] + value.to_bytes(width, draw(st.sampled_from(("big", "little")))) + d[at + width:]


def insert_bytes(draw, d: bytes) -> bytes:
    at = _pos(draw, len(d))
    return d[:at] + draw(st.binary(min_size=1, max_size=64)) + d[at:]


def delete_range(draw, d: bytes) -> bytes:
    at = _pos(draw, len(d))
    return d[:at] + d[at + draw(st.integers(1, 256)):]


def truncate(draw, d: bytes) -> bytes:
    return d[:_pos(draw, len(d))]


def duplicate_range(draw, d: bytes) -> bytes:
    src, dst = _pos(draw, len(d)), _pos(draw, len(d))
    return d[:dst] + d[src:src + draw(st.integers(1, 4096))] + d[dst:]


def repeat_range(draw, d: bytes) -> bytes:
    src, dst = _pos(draw, len(d)), _pos(draw, len(d))
    chunk = d[src:src + draw(st.integers(1, 512))]
    return d[:dst] + chunk * draw(st.integers(2, 256)) + d[dst:]


def splice_seed(draw, d: bytes) -> bytes:
    other = seed_files()[draw(st.sampled_from(sorted(seed_files())))]
    return d[:_pos(draw, len(d))] + other[_pos(draw, len(other)):]


BYTE_OPS = (flip_bits, set_integer, insert_bytes, delete_range, truncate, duplicate_range, repeat_range,
            splice_seed)


# ------------------------------------------------------------------------------------ PNG structure

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_chunks(d: bytes) -> list[list[bytes]]:
    out, i = [], 8
    while i + 12 <= len(d):
        n = struct.unpack(">I", d[i:i + 4])[0]
        out.append([d[i + 4:i + 8], d[i + 8:i + 8 + n]])
        i += 12 + n
    return out


def png_build(chunks) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(k, b) for k, b in chunks)


PNG_IHDR = {  # field: (index in IHDR's struct, values to try)
    "width": (0, (0, 1, 7, 47, 49, 2000, 65535, 100_000, 2**31 - 1, 2**32 - 1)),
    "height": (1, (0, 1, 7, 39, 41, 2000, 65535, 100_000, 2**31 - 1, 2**32 - 1)),
    "depth": (2, (0, 1, 2, 3, 4, 8, 16, 32, 255)),
    "color": (3, (0, 1, 2, 3, 4, 5, 6, 7, 255)),
    "compression": (4, (1, 255)),
    "filter": (5, (1, 255)),
    "interlace": (6, (1, 2, 255)),
}


def png_set_ihdr(d: bytes, field: str, value: int) -> bytes:
    chunks = png_chunks(d)
    fields = list(struct.unpack(">IIBBBBB", chunks[0][1]))
    fields[PNG_IHDR[field][0]] = value
    chunks[0][1] = struct.pack(">IIBBBBB", *fields)
    return png_build(chunks)  # CRC recomputed


def draw_fields(draw, table: dict[str, tuple], most: int) -> list[tuple[str, object]]:
    """1..most (field, value) changes from a table of field: (..., values to try), values last."""
    changes = []
    for _ in range(draw(st.integers(1, most))):
        field = draw(st.sampled_from(sorted(table)))
        changes.append((field, draw(st.sampled_from(table[field][-1]))))
    return changes


def png_ihdr(draw, d: bytes, name: str) -> bytes:
    for field, value in draw_fields(draw, PNG_IHDR, 2):
        d = png_set_ihdr(d, field, value)
    return d


def png_chunk_body(draw, d: bytes, name: str) -> bytes:
    chunks = png_chunks(d)
    k = draw(st.integers(0, len(chunks) - 1))
    chunks[k][1] = draw(st.sampled_from(BYTE_OPS[:7]))(draw, chunks[k][1])
    return png_build(chunks)  # CRCs recomputed: the change reaches the chunk's parser


def png_scanlines(draw, d: bytes, name: str) -> bytes:
    """The inflated image data mutated (filter bytes, lengths), recompressed and re-split into IDATs."""
    chunks = png_chunks(d)
    idat = [i for i, (k, _) in enumerate(chunks) if k == b"IDAT"]
    raw = zlib.decompress(b"".join(chunks[i][1] for i in idat))
    raw = draw(st.sampled_from((flip_bits, set_integer, delete_range, truncate, repeat_range)))(draw, raw)
    z = zlib.compress(raw, draw(st.integers(0, 9)))
    n = draw(st.integers(1, 4))
    parts = [z[i * len(z) // n:(i + 1) * len(z) // n] for i in range(n)]
    return png_build(chunks[:idat[0]] + [[b"IDAT", p] for p in parts] + chunks[idat[-1] + 1:])


def png_reorder(draw, d: bytes, name: str) -> bytes:
    chunks = png_chunks(d)
    i, j = draw(st.integers(0, len(chunks) - 1)), draw(st.integers(0, len(chunks) - 1))
    how = draw(st.sampled_from(("drop", "duplicate", "swap")))
    if how == "drop":
        del chunks[i]
    elif how == "duplicate":
        chunks.insert(j, list(chunks[i]))
    else:
        chunks[i], chunks[j] = chunks[j], chunks[i]
    return png_build(chunks)


def png_extra_chunk(draw, d: bytes, name: str) -> bytes:
    """An ancillary or critical chunk added: random body, or a compressed one that inflates to 4 MB."""
    chunks = png_chunks(d)
    kind = draw(st.sampled_from((b"PLTE", b"tRNS", b"gAMA", b"sBIT", b"pHYs", b"iCCP", b"zTXt", b"iTXt",
                                 b"tEXt", b"eXIf", b"acTL", b"fcTL", b"fdAT", b"IEND", b"IHDR")))
    if draw(st.booleans()):
        body = draw(st.binary(max_size=300))
    else:
        body = b"k\0\0" + zlib.compress(bytes(4 << 20), 9)
    chunks.insert(draw(st.integers(0, len(chunks))), [kind, body])
    return png_build(chunks)


# ----------------------------------------------------------------------------------- JPEG structure

def jpeg_segments(d: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each marker segment from SOI up to and including SOS."""
    out, i = [], 2
    while i + 4 <= len(d) and d[i] == 0xFF:
        marker = d[i + 1]
        out.append((i, marker))
        if marker == 0xDA:
            break
        i += 2 + struct.unpack(">H", d[i + 2:i + 4])[0]
    return out


def _sof(d: bytes) -> int | None:
    for i, m in jpeg_segments(d):
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC) or m == 0xF7:
            return i
    return None


JPEG_SOF = {  # field: (offset from the SOFn marker, width in bytes, values to try)
    "marker": (1, 1, (0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCB, 0xCF, 0xF7)),  # extended, progressive, lossless, ...
    "precision": (4, 1, (0, 1, 2, 7, 8, 9, 12, 16, 17, 255)),
    "height": (5, 2, (0, 1, 7, 39, 41, 2000, 9000, 13000, 65500, 65535)),
    "width": (7, 2, (0, 1, 7, 47, 49, 2000, 9000, 13000, 65500, 65535)),
    "components": (9, 1, (0, 1, 2, 3, 4, 5, 255)),
    "sampling": (11, 1, (0x00, 0x12, 0x21, 0x44, 0x55, 0xFF)),
    "quant_table": (12, 1, (1, 3, 4, 255)),
}


def jpeg_set_sof(d: bytes, field: str, value: int, at: int | None = None) -> bytes:
    """A field of the first frame header changed; `at`: where the SOFn marker is (found if None)."""
    at = _sof(d) if at is None else at
    if at is None:  # an earlier change left no frame header
        return d
    offset, width, _ = JPEG_SOF[field]
    return d[:at + offset] + value.to_bytes(width, "big") + d[at + offset + width:]


def jpeg_sof(draw, d: bytes, name: str) -> bytes:
    for field, value in draw_fields(draw, JPEG_SOF, 2):
        d = jpeg_set_sof(d, field, value)
    return d


def jpeg_segment(draw, d: bytes, name: str) -> bytes:
    segs = jpeg_segments(d)
    at, _ = segs[draw(st.integers(0, len(segs) - 1))]
    n = struct.unpack(">H", d[at + 2:at + 4])[0]
    how = draw(st.sampled_from(("body", "length", "drop", "duplicate")))
    if how == "body":  # same length, different content (tables, APP data, component specs)
        body = draw(st.sampled_from((flip_bits, set_integer)))(draw, d[at + 4:at + 2 + n])
        return d[:at + 4] + body + d[at + 2 + n:]
    if how == "length":
        return d[:at + 2] + draw(st.sampled_from((0, 1, 2, 3, n - 1, n + 1, 0xFFFF))).to_bytes(2, "big") + d[at + 4:]
    if how == "drop":
        return d[:at] + d[at + 2 + n:]
    return d[:at] + d[at:at + 2 + n] + d[at:]


def jpeg_scan(draw, d: bytes, name: str) -> bytes:
    """Entropy-coded data damaged past the headers (markers and restart codes included)."""
    start = jpeg_segments(d)[-1][0]
    scan = draw(st.sampled_from((flip_bits, set_integer, insert_bytes, delete_range, truncate)))(draw, d[start:])
    if draw(st.booleans()):
        at = _pos(draw, len(scan))
        scan = scan[:at] + draw(st.sampled_from((b"\xff\xd0", b"\xff\xd9", b"\xff\xd8", b"\xff\x00", b"\xff\xda",
                                                 b"\xff\xc4\x00\x02", b"\xff\xff\xff"))) + scan[at:]
    return d[:start] + scan


def jpeg_exif_orientation(draw, d: bytes, name: str) -> bytes:
    value = draw(st.sampled_from((0, 1, 2, 3, 4, 5, 7, 8, 9, 255, 65535)))
    film = radiograph(np.random.default_rng(11), (40, 48))
    return bf.exif_rotated_jpeg(film, orientation=value)


# ---------------------------------------------------------------------------------- DICOM structure

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}
DS_VALUES = ("0", "-1", "1", "1e-300", "1e308", "-1e308", "nan", "inf", "-inf", "abc", "", "1\\2")
DICOM_TAGS = {  # keyword: (VR, values to try)
    "Rows": ("US", (0, 1, 7, 39, 41, 2000, 4096, 65535)),
    "Columns": ("US", (0, 1, 7, 47, 49, 2000, 4096, 65535)),
    "BitsAllocated": ("US", (0, 1, 7, 8, 12, 16, 24, 32, 64, 65535)),
    "BitsStored": ("US", (0, 1, 7, 8, 12, 16, 17, 32, 64, 65535)),
    "HighBit": ("US", (0, 7, 11, 15, 16, 31, 63, 65535)),
    "PixelRepresentation": ("US", (0, 1, 2, 65535)),
    "SamplesPerPixel": ("US", (0, 1, 2, 3, 4, 65535)),
    "PlanarConfiguration": ("US", (0, 1, 2, 65535)),
    "PhotometricInterpretation": ("CS", ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                         "YBR_FULL_422", "YBR_ICT", "HSV", "", "GARBAGE", "X" * 64)),
    "NumberOfFrames": ("IS", ("0", "-1", "1", "2", "999999999", "99999999999999999999", "abc", "1.5", "")),
    "RescaleSlope": ("DS", DS_VALUES),
    "RescaleIntercept": ("DS", DS_VALUES),
    "WindowCenter": ("DS", DS_VALUES),
    "WindowWidth": ("DS", DS_VALUES),
    "VOILUTFunction": ("CS", ("LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS", "")),
    "ViewPosition": ("CS", ("PA", "AP", "../../etc/passwd", "A" * 200, "\u00ff\u00fe", "")),
    "PatientID": ("LO", (bf.PHI_ID, bf.PHI_ID * 40, "", "\\" * 8)),
    "SpecificCharacterSet": ("CS", ("ISO_IR 192", "ISO 2022 IR 87", "BOGUS", "\\\\\\")),
    "RedPaletteColorLookupTableDescriptor": ("US", ((256, 0, 8), (0, 0, 16), (65535, 65535, 16), (1, 0, 255))),
    "RedPaletteColorLookupTableData": ("OW", (b"", b"\xff" * 3, bytes(512))),
    "PixelPaddingValue": ("US", (0, 65535)),
    "LossyImageCompression": ("CS", ("01", "XX")),
}
SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.8.1", "1.2.3.4", "not a uid", "")


def _encode(vr: str, value) -> bytes:
    if isinstance(value, bytes):
        raw = value
    elif vr == "US":
        raw = b"".join(struct.pack("<H", v) for v in (value if isinstance(value, tuple) else (value,)))
    else:
        raw = value.encode("utf-8", "surrogateescape")
    return raw + (b" " if len(raw) % 2 and vr not in LONG_VRS else b"\0" if len(raw) % 2 else b"")


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    g, e = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHI", g, e, len(value)) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", g, e, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", g, e, vr.encode(), len(value) & 0xFFFF) + value


def _dataset_layout(d: bytes):
    """[(tag, header start, value start, value end)] of the top-level dataset elements, and whether the
    encoding is implicit VR; raises if pydicom cannot lay the file out (then the op changes nothing)."""
    import pydicom

    with quiet_pydicom():
        ds = pydicom.dcmread(io.BytesIO(d), force=True)
        implicit = bool(ds.original_encoding[0])
        out = []
        for tag in ds.keys():
            raw = ds.get_item(tag)
            tell = getattr(raw, "value_tell", None)
            if tell is None:
                continue
            head = 8 if implicit or raw.VR not in LONG_VRS else 12
            end = tell + (raw.length if raw.length != 0xFFFFFFFF else len(d) - tell)
            out.append((int(tag), tell - head, tell, end))
    return out, implicit


def _with_plain(d: bytes, name: str, change) -> bytes:
    """Apply `change` to the file, or to the plain twin of a deflated seed and deflate it again."""
    if name == "dicom_deflated":
        return to_deflated(change(seed_files()["dicom_mono2"]))
    return change(d)


def dicom_set(data: bytes, keyword: str, value) -> bytes:
    """A DICOM file with one top-level element of DICOM_TAGS replaced, or inserted in tag order,
    spliced as bytes (so pydicom's writer cannot refuse or repair the value)."""
    from pydicom.datadict import tag_for_keyword

    try:
        layout, implicit = _dataset_layout(data)
    except Exception:  # noqa: BLE001 - the seeds always lay out; a mutated file may not: no change
        return data
    tag, vr = tag_for_keyword(keyword), DICOM_TAGS[keyword][0]
    element = _element(tag, vr, _encode(vr, value), implicit)
    for t, head, _, end in layout:
        if t == tag:
            return data[:head] + element + data[end:]
        if t > tag:
            return data[:head] + element + data[head:]
    return data + element


def dicom_tag(draw, d: bytes, name: str) -> bytes:
    changes = draw_fields(draw, DICOM_TAGS, 3)

    def change(data: bytes) -> bytes:
        for keyword, value in changes:
            data = dicom_set(data, keyword, value)
        return data
    return _with_plain(d, name, change)


def dicom_pixel_length(draw, d: bytes, name: str) -> bytes:
    """The Pixel Data element's length field set to an extreme (undefined, huge, odd, zero)."""
    new = draw(st.sampled_from((0, 1, 2, 3, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF)))

    def change(data: bytes) -> bytes:
        at = data.rfind(b"\xe0\x7f\x10\x00")
        if at < 0:
            return data
        at += 8 if data[at + 4:at + 6] in (b"OB", b"OW") else 4
        return data[:at] + struct.pack("<I", new) + data[at + 4:]
    return _with_plain(d, name, change)


def _set_syntax(d: bytes, uid: str) -> bytes:
    """The file meta's Transfer Syntax UID replaced (group length left as it was)."""
    value = _encode("UI", uid)
    at = d.find(b"\x02\x00\x10\x00UI")
    if at < 0:
        return d
    n = struct.unpack("<H", d[at + 6:at + 8])[0]
    return d[:at + 6] + struct.pack("<H", len(value)) + value + d[at + 8 + n:]


def dicom_syntax(draw, d: bytes, name: str) -> bytes:
    return _set_syntax(d, draw(st.sampled_from(SYNTAXES)))


DICOM_SOF = {"dicom_jpeg": b"\xff\xc0", "dicom_jpeg_lossless": b"\xff\xc3", "dicom_jpegls": b"\xff\xf7"}


def dicom_sof(name: str, field: str, value: int) -> bytes:
    """A JPEG-family DICOM seed with a field of its frame header changed."""
    data = seed_files()[name]
    return jpeg_set_sof(data, field, value, data.find(DICOM_SOF[name]))


def dicom_codestream(draw, d: bytes, name: str) -> bytes:
    """The compressed frame's own header changed: JPEG SOF, JPEG 2000 SIZ, or the RLE segment table."""
    b = bytearray(d)
    dims = st.sampled_from((0, 1, 39, 40, 47, 48, 2000, 9000, 30000, 65535))
    if name in DICOM_SOF and (at := d.find(DICOM_SOF[name])) > 0:
        field = draw(st.sampled_from(sorted(JPEG_SOF)))
        return jpeg_set_sof(d, field, draw(st.sampled_from(JPEG_SOF[field][2])), at)
    elif name == "dicom_j2k" and (at := d.find(b"\xff\x4f\xff\x51")) > 0:
        field = draw(st.sampled_from((8, 12, 16, 24, 28, 40)))  # Xsiz, Ysiz, XOsiz, XTsiz, YTsiz, Csiz
        width = 2 if field == 40 else 4
        b[at + field:at + field + width] = (draw(dims) if width == 4 else draw(st.sampled_from(
            (0, 2, 3, 300, 16384, 65535)))).to_bytes(width, "big")
    elif name == "dicom_rle" and (at := d.find(b"\xfe\xff\x00\xe0", d.rfind(b"\xe0\x7f\x10\x00") + 12)) > 0:
        at = d.find(b"\xfe\xff\x00\xe0", at + 8)  # past the basic offset table: the frame's RLE header
        k = draw(st.integers(0, 15))
        b[at + 8 + 4 * k:at + 12 + 4 * k] = struct.pack("<I", draw(st.sampled_from((0, 1, 15, 16, 64, 0xFFFFFFFF))))
    return bytes(b)


def dicom_lut(draw, d: bytes, name: str) -> bytes:
    """A VOI LUT or Modality LUT sequence with extreme descriptors and short or long data."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def change(data: bytes) -> bytes:
        try:
            with quiet_pydicom(), pydicom.config.disable_value_validation():
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                item = Dataset()
                item.LUTDescriptor = list(draw(st.sampled_from(((256, 0, 8), (0, 0, 16), (65535, 32768, 16),
                                                                (4096, 0, 12), (2, 0, 0), (1, 65535, 64)))))
                item.LUTData = draw(st.sampled_from(([0, 255], list(range(256)), [0] * 4096, [])))
                item["LUTData"].VR = "US"
                setattr(ds, draw(st.sampled_from(("VOILUTSequence", "ModalityLUTSequence"))), Sequence([item]))
                out = io.BytesIO()
                ds.save_as(out)
                return out.getvalue()
        except Exception:  # noqa: BLE001 - pydicom refused to write this combination: no change
            return data
    return _with_plain(d, name, change)


STRUCTURAL = {
    "png": (png_ihdr, png_chunk_body, png_scanlines, png_reorder, png_extra_chunk),
    "jpeg": (jpeg_sof, jpeg_segment, jpeg_scan, jpeg_exif_orientation),
    "dicom": (dicom_tag, dicom_tag, dicom_tag, dicom_pixel_length, dicom_syntax, dicom_codestream, dicom_lut),
    "gif": (), "tiff": (),
}


@st.composite
def mutated_files(draw):
    """(seed name, names of the mutations applied, mutated bytes): an optional format-aware change,
    then up to four byte-level ones; at least one mutation in all."""
    seeds = seed_files()
    name = draw(st.sampled_from(sorted(seeds)))
    data, ops = seeds[name], []
    structural = STRUCTURAL[name.split("_")[0]]
    if structural and draw(st.booleans()):
        op = draw(st.sampled_from(structural))
        if op is not jpeg_exif_orientation or name == "jpeg_exif":
            data = op(draw, data, name)
            ops.append(op.__name__)
    for _ in range(draw(st.integers(0 if ops else 1, 4))):
        op = draw(st.sampled_from(BYTE_OPS))
        data = op(draw, data)
        ops.append(op.__name__)
    return name, tuple(ops), bytes(data)
