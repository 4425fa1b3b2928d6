"""Regression tests for what the fuzzing found in the decoder (tests/test_fuzz_decoder.py): deflated
DICOMs, a Rust plugin's panic, pydicom's plugin logging, python-gdcm's aborts, and the bounded
inflation of deflated datasets.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.data.decode import DecodeError, decode
from tests.fuzz_mutations import BYTE_OPS, STRUCTURAL, dicom_set, dicom_sof
from tests.fuzz_seeds import seed_files, to_deflated
from tests.fuzz_support import VIEWER_MAX_PIXELS, DecoderProcess, _settings

pytestmark = [pytest.mark.usefixtures("hypothesis_home"),
              pytest.mark.filterwarnings("ignore::ResourceWarning")]


def test_deflated_dicom_decodes_like_the_plain_file():
    plain = seed_files()["dicom_mono2"]
    a, b = decode(plain), decode(to_deflated(plain))
    assert np.array_equal(a.pixels, b.pixels) and a.patient_hash == b.patient_hash
    assert b.info["transfer_syntax"] == "Deflated Explicit VR Little Endian"
    raw = decode(to_deflated(plain)[128 + 4:])  # no preamble: meta first, as some exports write it
    assert np.array_equal(raw.pixels, a.pixels)


def _rle_with(keyword: str | None = None, value=None, offset: tuple[int, int] | None = None) -> bytes:
    """The RLE seed with one header tag changed, or one entry of its frame's RLE segment table."""
    data = seed_files()["dicom_rle"]
    if keyword is not None:
        data = dicom_set(data, keyword, value)
    if offset is not None:
        at = data.find(b"\xfe\xff\x00\xe0", data.rfind(b"\xe0\x7f\x10\x00") + 12)
        at = data.find(b"\xfe\xff\x00\xe0", at + 8) + 8 + 4 * offset[0]
        data = data[:at] + struct.pack("<I", offset[1]) + data[at + 4:]
    return data


def test_a_rust_plugin_panic_is_a_decode_error():
    """Was: pylibjpeg-rle panics on an RLE frame longer than Rows x Columns, and pyo3's PanicException
    is a BaseException, so it went past `except Exception`: a crash in-process, a 500 in the viewer."""
    for rows in (1, 7, 39):
        with pytest.raises(DecodeError, match=r"^unreadable image \(PanicException\)$"):
            decode(_rle_with("Rows", rows))


def test_failed_pixel_plugins_log_nothing(caplog):
    """Was: pydicom.pixels.decoders.base logged every failed plugin at ERROR with a traceback: its logger
    is a child of 'pydicom', and `disabled` on a parent does not silence children."""
    import logging

    log = logging.getLogger("pydicom")
    level, disabled = log.level, log.disabled
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DecodeError, match="corrupt DICOM pixel data"):  # every RLE plugin fails on it
        decode(_rle_with(offset=(1, 0xFFFFFFFF)))
    assert not [r for r in caplog.records if r.name.startswith("pydicom")], caplog.text[:500]
    assert "Traceback" not in caplog.text
    assert (log.level, log.disabled) == (level, disabled)  # restored


def test_files_that_made_gdcm_kill_the_process_are_refused_or_decoded():
    """Was: python-gdcm, pydicom's first plugin for JPEG and JPEG 2000, aborted (a C++ exception through
    its bindings) or segfaulted on these one-field changes, taking the whole viewer down. Decoded in a
    child process here, so a regression fails this test instead of killing pytest."""
    seeds = seed_files()
    cases = {
        "J2K, photometric RGB over one component": dicom_set(seeds["dicom_j2k"], "PhotometricInterpretation", "RGB"),
        "J2K, photometric YBR_ICT": dicom_set(seeds["dicom_j2k"], "PhotometricInterpretation", "YBR_ICT"),
        "JPEG baseline, BitsStored 7": dicom_set(seeds["dicom_jpeg"], "BitsStored", 7),
        "JPEG baseline, BitsAllocated 32": dicom_set(seeds["dicom_jpeg"], "BitsAllocated", 32),
        "JPEG baseline, precision 17": dicom_sof("dicom_jpeg", "precision", 17),
        "JPEG lossless, BitsAllocated 64": dicom_set(seeds["dicom_jpeg_lossless"], "BitsAllocated", 64),
        "JPEG lossless, precision 255": dicom_sof("dicom_jpeg_lossless", "precision", 255),
        "JPEG-LS, precision 17": dicom_sof("dicom_jpegls", "precision", 17),
    }
    worker = DecoderProcess(VIEWER_MAX_PIXELS)
    try:
        outcomes = {name: worker.decode(data, 60)[:2] for name, data in cases.items()}
    finally:
        worker.close()
    assert all(o in ("decoded", "refused") for o, _ in outcomes.values()), outcomes
    assert worker.restarts == 0


def test_jpeg_lossless_with_bits_stored_unlike_its_precision_still_decodes():
    """gdcm is told the JPEG's own precision, so a file whose BitsStored (10) differs from its 12-bit
    JPEG frame decodes as before, without gdcm's abort-prone retry."""
    seeds = seed_files()
    plain = decode(seeds["dicom_jpeg_lossless"]).pixels
    assert np.array_equal(decode(dicom_set(seeds["dicom_jpeg_lossless"], "BitsStored", 10)).pixels, plain)
    assert np.array_equal(plain, decode(seeds["dicom_mono1_12bit"]).pixels)


def test_bounded_inflation_reads_deflated_files_as_pydicom_does(monkeypatch):
    """The bounded inflation of a deflated dataset (dicom._read_deflated) must not change what a
    mutated deflated file decodes to, or whether it is refused, compared with pydicom's own reading."""
    import pipeline.data.dicom as dicom_module

    def outcome(data: bytes):
        try:
            d = decode(data)
        except DecodeError:
            return "refused"
        return d.format, d.pixels.shape, float(d.pixels.sum()), d.patient_hash, d.view, d.info.get("transfer_syntax")

    @_settings(300)
    @given(data=st.data())
    def same(data):
        d = seed_files()["dicom_deflated"]
        if data.draw(st.booleans()):
            d = data.draw(st.sampled_from(STRUCTURAL["dicom"]))(data.draw, d, "dicom_deflated")
        for _ in range(data.draw(st.integers(0, 3))):
            d = data.draw(st.sampled_from(BYTE_OPS))(data.draw, d)
        ours = outcome(d)
        with monkeypatch.context() as m:
            m.setattr(dicom_module, "_read_deflated", lambda *args: None)  # pydicom inflates, unbounded
            assert outcome(d) == ours

    same()
