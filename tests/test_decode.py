"""The safe decoder: the same image from every format, and every hostile file refused quickly and quietly."""
from __future__ import annotations

import io
import logging
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.decode import DEFAULT_MAX_PIXELS, Decoded, DecodeError, decode, salted_hash
from pipeline.data.dicom import quiet_pydicom
from tests.fixtures import bad_files as bf
from tests.fixtures.images import radiograph, write_dicom, write_png

LSB = 1 / 255 + 1e-6


@pytest.fixture(scope="module")
def film() -> np.ndarray:
    """A 96 x 80 uint8 phantom radiograph (not square, so rotations and transposes show)."""
    return radiograph(np.random.default_rng(7), (96, 80))


def _ramp(h: int = 40, w: int = 50, hi: int = 4095) -> np.ndarray:
    """A uint16 ramp from 0 to `hi` with a bright asymmetric block, so orientation errors show."""
    a = np.linspace(0, hi, h * w).reshape(h, w)
    a[2:10, :7] = hi  # leaves a[0, 0] = 0, the minimum
    return np.round(a).astype(np.uint16)


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b).mean())


def _check_contract(d: Decoded) -> None:
    assert d.pixels.dtype == np.float32 and d.pixels.ndim == 2
    assert 0.0 <= float(d.pixels.min()) and float(d.pixels.max()) <= 1.0


# ------------------------------------------------------------------------------------------ rasters

def test_png_8_and_16_bit_give_the_same_image(film):
    eight = decode(bf.raster_bytes(film))
    sixteen = decode(bf.raster_bytes(film.astype(np.uint16) * 257))  # full 16-bit range
    twelve = decode(bf.raster_bytes(np.round(film.astype(np.float64) * 4095 / 255).astype(np.uint16)))
    for d in (eight, sixteen, twelve):
        _check_contract(d)
    assert np.allclose(eight.pixels, film / 255.0, atol=1e-6)
    assert np.allclose(sixteen.pixels, eight.pixels, atol=1e-6)
    assert np.allclose(twelve.pixels, eight.pixels, atol=1 / 4095 + 1e-6)  # unscaled 12-bit: by its range
    assert sixteen.info["mode"].startswith("I") and eight.format == sixteen.format == "png"


@pytest.mark.parametrize("fmt,mode,tol", [
    ("PNG", "RGB", LSB), ("PNG", "RGBA", LSB), ("PNG", "P", LSB), ("PNG", "LA", LSB),
    ("JPEG", "RGB", 0.02), ("JPEG", "CMYK", 0.02), ("GIF", "P", LSB), ("TIFF", "RGB", LSB),
])
def test_colour_and_palette_files_become_grayscale(film, fmt, mode, tol):
    d = decode(bf.raster_bytes(film, fmt, mode=mode))
    _check_contract(d)
    assert _mae(d.pixels, film / 255.0) <= tol


def test_alpha_is_composited_on_black(film):
    rgba = np.dstack([film, film, film, np.full_like(film, 255)])
    rgba[:, :40, 3] = 0  # left half transparent
    rgba[:, 40:60, 3] = 128
    d = decode(bf.raster_bytes(rgba))
    assert np.all(d.pixels[:, :40] == 0)
    assert np.allclose(d.pixels[:, 40:60], film[:, 40:60] / 255.0 * 128 / 255, atol=LSB)
    assert np.allclose(d.pixels[:, 60:], film[:, 60:] / 255.0, atol=LSB)


def test_exif_orientation_is_applied(film):
    plain = decode(bf.raster_bytes(film, "JPEG", quality=95)).pixels
    rotated = decode(bf.exif_rotated_jpeg(film, orientation=6))  # same stored pixels, EXIF says turn 90 cw
    assert rotated.pixels.shape == (80, 96)
    assert np.array_equal(rotated.pixels, np.rot90(plain, -1))
    assert (rotated.info["width"], rotated.info["height"]) == (96, 80)


def test_animated_gif_gives_its_first_frame(film):
    d = decode(bf.animated_gif([film, 255 - film]))
    assert d.info.get("animated") is True
    assert _mae(d.pixels, film / 255.0) <= LSB


def test_path_and_bytes_decode_alike(tmp_path, film):
    path = write_png(tmp_path / "a.png", film)
    assert np.array_equal(decode(path).pixels, decode(path.read_bytes()).pixels)


# -------------------------------------------------------------------------------------------- DICOM

def test_monochrome1_and_monochrome2_twins_decode_equal(tmp_path, film):
    m2 = decode(write_dicom(tmp_path / "m2.dcm", film, patient_id="p"))
    m1 = decode(write_dicom(tmp_path / "m1.dcm", film, patient_id="p", monochrome1=True))
    _check_contract(m1)
    assert np.abs(m1.pixels - m2.pixels).max() <= LSB
    assert m1.info["photometric"] == "MONOCHROME1" and m2.format == "dicom"


def test_rescale_and_first_window_are_applied():
    stored = _ramp(hi=3000)
    slope, intercept, center, width = 2.0, -1024.0, 1500.0, 2001.0
    data = bf.dicom_bytes(stored, bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept,
                          WindowCenter=[center, 0.0], WindowWidth=[width, 10.0])  # the first window counts
    hu = stored * slope + intercept  # -1024 .. 4976: past the window on both sides
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    got = decode(data).pixels
    assert np.abs(got - expected).max() < 1e-3
    assert got.min() == 0 and got.max() == 1  # both ends clipped, so min-max keeps the window


def test_voi_lut_sequence_is_preferred_to_the_window():
    from pydicom.dataset import Dataset

    stored = _ramp(hi=255).astype(np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.add_new("LUTData", "OW", (np.sqrt(np.arange(256) / 255) * 65535).astype("<u2").tobytes())
    data = bf.dicom_bytes(stored, bits_stored=8, VOILUTSequence=[lut], WindowCenter=10.0, WindowWidth=5.0)
    expected = np.sqrt(stored / 255.0)
    assert np.abs(decode(data).pixels - expected).max() < 1e-3


def test_12_bit_in_16_allocated_ignores_the_unused_bits():
    stored = _ramp(hi=4095)
    clean = decode(bf.dicom_bytes(stored, bits_stored=12))
    dirty = decode(bf.dicom_bytes(stored | 0xF000, bits_stored=12))  # overlay garbage above bit 11
    assert np.allclose(clean.pixels, stored / 4095.0, atol=1e-6)
    assert np.array_equal(clean.pixels, dirty.pixels)
    assert clean.info["bits_stored"] == 12


def test_signed_pixels_keep_their_order():
    stored = _ramp(hi=2000).astype(np.int16) - 1000  # -1000 .. 1000
    d = decode(bf.dicom_bytes(stored))
    assert d.info["signed"] is True
    assert np.allclose(d.pixels, (stored + 1000) / 2000.0, atol=1e-6)


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_lossless_compressed_dicom_equals_uncompressed(syntax):
    stored = _ramp(hi=4095)
    native = decode(bf.dicom_bytes(stored, bits_stored=12)).pixels
    packed = decode(bf.dicom_bytes(stored, bits_stored=12, syntax=syntax))
    assert packed.info["transfer_syntax"] != "Explicit VR Little Endian"
    assert np.array_equal(packed.pixels, native)


def test_jpeg_lossless_dicom_equals_uncompressed(tmp_path, film):
    """JPEG Lossless (process 14) is what many CR/DX archives hold; python-gdcm decodes it."""
    gdcm = pytest.importorskip("gdcm")
    native_path = tmp_path / "native.dcm"
    native_path.write_bytes(bf.dicom_bytes(film))
    reader = gdcm.ImageReader()
    reader.SetFileName(str(native_path))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(tmp_path / "lossless.dcm"))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    packed = decode(tmp_path / "lossless.dcm")
    assert packed.info["transfer_syntax"].startswith("JPEG Lossless")
    assert np.array_equal(packed.pixels, decode(native_path).pixels)


@pytest.mark.parametrize("color", [False, True])
def test_jpeg_baseline_dicom_is_close_to_uncompressed(film, color):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit

    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG baseline decoder installed")
    pixels = np.dstack([film] * 3) if color else film
    native = decode(bf.dicom_bytes(film)).pixels
    lossy = decode(bf.dicom_bytes(pixels, syntax="jpeg"))
    assert lossy.info["transfer_syntax"].startswith("JPEG Baseline")
    assert _mae(lossy.pixels, native) < 0.02


def test_rgb_dicom_becomes_luma(film):
    rgb = np.dstack([film, film // 2, 255 - film])
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = (luma - luma.min()) / (luma.max() - luma.min())
    assert np.abs(decode(bf.dicom_bytes(rgb)).pixels - expected).max() < 1e-4


def test_dicom_without_preamble_is_recognised(film):
    d = decode(bf.dicom_bytes(film, preamble=False))
    assert d.format == "dicom"
    assert np.allclose(d.pixels, decode(bf.dicom_bytes(film)).pixels)


def test_compressed_syntax_without_decoder_is_named(monkeypatch):
    with pytest.raises(DecodeError, match="no decoder for MPEG2"):
        decode(bf.dicom_unknown_syntax())

    import pydicom.pixels

    class Missing:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Missing())
    with pytest.raises(DecodeError, match="no decoder for RLE Lossless"):
        decode(bf.dicom_bytes(_ramp(), syntax="rle"))


# ---------------------------------------------------------------------------------------- bad files

_BAD = {  # name: (generator of the file from a film, what the message must say)
    "no pixel data": (lambda f: bf.dicom_without_pixels(), "DICOM has no pixel data"),
    "multi-frame": (lambda f: bf.multiframe_dicom(), "multi-frame DICOM .* not supported"),
    "truncated png": (lambda f: bf.truncated(bf.raster_bytes(f)), "truncated"),
    "truncated jpeg": (lambda f: bf.truncated(bf.raster_bytes(f, "JPEG")), "truncated"),
    "truncated dicom": (lambda f: bf.truncated(bf.dicom_bytes(f)), "truncated"),
    "truncated rle dicom": (lambda f: bf.truncated(bf.dicom_bytes(_ramp(), syntax="rle"), 0.8),
                            "truncated|no pixel data"),
    "png signature only": (lambda f: bf.raster_bytes(f)[:20], "truncated or corrupt image header"),
    "jpeg signature only": (lambda f: bf.raster_bytes(f, "JPEG")[:4], "truncated|not a PNG, JPEG or DICOM"),
    "random bytes": (lambda f: bf.random_bytes(), "not a PNG, JPEG or DICOM"),
    "empty": (lambda f: bf.empty(), "empty file"),
    "png bomb": (lambda f: bf.png_bomb(), "exceed"),
    "png bomb under PIL's limit": (lambda f: bf.png_bomb(9000, 9000), "9000x9000 pixels exceed"),
    "dicom bomb": (lambda f: bf.dicom_bomb(), "65535x65535 pixels exceed"),
    "native dicom bomb": (lambda f: bf.dicom_bomb(syntax=None), "65535x65535 pixels exceed"),
    "multi-frame bomb": (lambda f: bf.multiframe_bomb(), "exceed"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_files_are_refused_quickly_with_one_line(film, case):
    make, pattern = _BAD[case]
    data = make(film)
    start = time.perf_counter()
    with pytest.raises(DecodeError, match=pattern) as err:
        decode(data)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    assert err.value.__cause__ is None


def test_limits_are_options(film):
    with pytest.raises(DecodeError, match="exceed the limit of 100"):
        decode(bf.raster_bytes(film), max_pixels=100)
    with pytest.raises(DecodeError, match="exceed the limit of 100"):
        decode(bf.dicom_bytes(film), max_pixels=100)
    with pytest.raises(DecodeError, match="exceeds the limit of 64 bytes"):
        decode(bf.raster_bytes(film), max_bytes=64)
    assert DEFAULT_MAX_PIXELS >= 2048 * 2048 * 4


def test_unreadable_path_names_no_path(tmp_path):
    missing = tmp_path / "PID-8842-SECRET" / "x.png"
    with pytest.raises(DecodeError) as err:
        decode(missing)
    assert str(tmp_path) not in str(err.value) and "PID-8842" not in str(err.value)


def test_global_state_is_left_alone(film):
    import pydicom.config

    mode, disabled = pydicom.config.settings.reading_validation_mode, logging.getLogger("pydicom").disabled
    filters = list(warnings.filters)
    for data in (bf.png_bomb(), bf.raster_bytes(film), bf.dicom_bytes(film), bf.random_bytes()):
        try:
            decode(data)
        except DecodeError:
            pass
    assert pydicom.config.settings.reading_validation_mode == mode
    assert logging.getLogger("pydicom").disabled == disabled
    assert warnings.filters == filters
    assert not ImageFile.LOAD_TRUNCATED_IMAGES and Image.MAX_IMAGE_PIXELS == 89478485


# ------------------------------------------------------------------------------------------ privacy

LONG_ID = bf.PHI_ID + "-" + "0" * 60  # over LO's 64 characters: pydicom warns when it is read


def _phi_dicoms(film) -> list[bytes]:
    """Identifiers in the usual tags, and in places a careless decoder would echo (an over-long
    PatientID pydicom warns about, the view, a bogus transfer syntax)."""
    tags = dict(patient_name=bf.PHI_NAME, PatientSex=bf.PHI_NAME.lower(), OtherPatientIDs=bf.PHI_ID)
    return [bf.dicom_bytes(film, patient_id=LONG_ID, **tags), bf.dicom_bytes(film, view=bf.PHI_NAME, **tags),
            bf.dicom_without_pixels(patient_id=LONG_ID, **tags),
            bf.dicom_unknown_syntax("1.2.3." + bf.PHI_ID, patient_id=bf.PHI_ID, **tags),
            bf.truncated(bf.dicom_bytes(film, patient_id=LONG_ID, **tags), 0.9),
            bf.dicom_bytes(film, preamble=False, patient_id=LONG_ID, **tags)]


def test_patient_identifiers_never_leave_the_decoder(film, caplog):
    import pydicom

    with pytest.warns(UserWarning):  # the test has teeth: plain pydicom warns about this header
        assert pydicom.dcmread(io.BytesIO(_phi_dicoms(film)[0])).PatientID == LONG_ID
    seen: list[str] = []
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in _phi_dicoms(film):
            try:
                d = decode(data, id_salt="salt")
                seen += [repr(d), str(d.info), str(d.view)]
            except DecodeError as err:
                seen.append(str(err))
    assert not caught and not caplog.records  # decoding is silent
    text = "\n".join(seen).lower()
    assert "dicom has no pixel data" in text and "no decoder for" in text  # the refusals were seen
    for secret in (bf.PHI_ID, bf.PHI_NAME, "zebedee", "margarethe", "8842"):
        assert secret.lower() not in text


def test_patient_hash_is_stable_per_salt(film):
    data = bf.dicom_bytes(film, patient_id=bf.PHI_ID)
    a1, a2, b = (decode(data, id_salt=s).patient_hash for s in ("a", "a", "b"))
    assert a1 == a2 == salted_hash(bf.PHI_ID, "a") and a1 != b
    assert decode(bf.dicom_bytes(film)).patient_hash is None
    assert decode(data).view == "PA"


def test_quiet_pydicom_restores_settings():
    import pydicom.config

    before = pydicom.config.settings.reading_validation_mode
    with quiet_pydicom():
        assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
        with quiet_pydicom():  # re-entrant (rsna wraps decode in it)
            pass
        assert logging.getLogger("pydicom").disabled
    assert pydicom.config.settings.reading_validation_mode == before
