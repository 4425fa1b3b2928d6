"""What the fuzz tests (tests/test_fuzz_*.py, the reliability suite's fuzzing) share: the limits
every case is held to, the hypothesis settings, the checks of a decoded image and of an error
message, and the harness that runs the decoder in a child process and samples a process's memory.

Contract checked for every case:
- decoder: a finite float32 (H, W) array in [0, 1], or DecodeError with one line naming no path and
  no PHI; any other exception is a crash, and so is a native abort or segfault: the decoder runs in
  a worker process (DecoderProcess), so such a crash fails the case (and is shrunk) instead of
  ending pytest. No temp file is written (private TMPDIR); the worker's RSS stays bounded.
- HTTP: 200 with the prediction JSON, or a 4xx JSON `{"error": one line}`; never a 5xx or a dropped
  connection; no traceback, file path, temp dir or DICOM identifier in any response or in the
  server's log; the viewer's temp dirs (Gradio's and its TMPDIR) hold no new file afterwards; the
  server's RSS stays bounded (see RSS_* below) and /api/v1/health answers at the end.

The short variants run in `make test`; the long ones (`-m slow`) run 28,000 cases. Case counts:
SHORT / LONG below; CXR_FUZZ_DECODER_CASES and CXR_FUZZ_HTTP_CASES override the long variant's.
Runs are derandomized (the same cases every time) and hypothesis keeps no database. A module that
runs hypothesis uses conftest's `hypothesis_home` fixture.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from hypothesis import HealthCheck, Phase, settings

from pipeline.data.decode import DecodeError, Decoded, decode
from tests.conftest import ROOT
from tests.fixtures import bad_files as bf

SHORT = {"decoder": 500, "http": 300}
LONG = {"decoder": int(os.environ.get("CXR_FUZZ_DECODER_CASES", 20000)),
        "http": int(os.environ.get("CXR_FUZZ_HTTP_CASES", 8000))}
VIEWER_MAX_PIXELS = 4_000_000   # the viewer of tests/viewer_support.py: CXR_MAX_PIXELS=4000000, 2 MB uploads
BOMB_SECONDS = 1.0
CASE_SECONDS = 5.0              # no single fuzz case may take longer (a hang or a slow bomb is a failure)
# Server memory. The largest request the test viewer accepts is 4 Mpixel: decoded float32 16 MB, a DICOM's
# float64 min-max 32 MB, PIL's buffer up to 16 MB, a 2 MB upload, at most 9 MB of inflated deflated DICOM:
# under 100 MB alive at once, and analyses are serialised. So the peak over the warmed-up process stays under
# RSS_PEAK_MB, and what is left after the run (allocator caches) under RSS_GROWTH_MB: a leak of 20 kB a
# request would pass that over the long variant's 8,000 requests.
RSS_PEAK_MB = 400
RSS_GROWTH_MB = 150
FORBIDDEN = ("Traceback", 'File "', "/work", "/tmp", "/home", "/root", "/usr", "site-packages", ".py\"",
             str(ROOT), bf.PHI_ID, "ZEBEDEE", "MARGARETHE")


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------------ checks

def check_decoded(d: Decoded) -> None:
    assert isinstance(d, Decoded)
    px = d.pixels
    assert isinstance(px, np.ndarray) and px.dtype == np.float32 and px.ndim == 2 and px.size > 0
    assert np.isfinite(px).all() and float(px.min()) >= 0.0 and float(px.max()) <= 1.0
    text = json.dumps({"format": d.format, "view": d.view, "info": d.info}, default=str)
    assert not any(s in text for s in FORBIDDEN), text


def check_message(message: str, extra: tuple[str, ...] = ()) -> None:
    assert message and "\n" not in message and len(message) < 300, repr(message)
    assert not any(s in message for s in FORBIDDEN + extra), message


def _files(*dirs: Path) -> set[Path]:
    return {p for d in dirs for p in Path(d).rglob("*") if not p.is_dir()}


def _decode_worker(conn, max_pixels: int) -> None:
    """Child process: decode each file received and send back (outcome, detail, ms); outcome is
    'decoded', 'refused' (DecodeError), 'broken' (decoded, but the contract is not met) or 'crash'
    (any other exception). A native crash kills this process; the parent reports that."""
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        t = time.perf_counter()
        try:
            decoded = decode(data, max_pixels=max_pixels)
        except DecodeError as err:
            outcome, detail = "refused", str(err)
        except BaseException as err:  # noqa: BLE001 - reported to the parent as a crash
            outcome, detail = "crash", f"{type(err).__module__}.{type(err).__name__}: {str(err)[:200]}"
        else:
            try:
                check_decoded(decoded)
                outcome, detail = "decoded", None
            except AssertionError as err:
                outcome, detail = "broken", str(err)[:300]
        conn.send((outcome, detail, (time.perf_counter() - t) * 1000))


class DecoderProcess:
    """decode() in a child process (spawned, so no lock or thread of this one is inherited): a
    decoder that aborts, segfaults or hangs fails one case instead of taking pytest down with it."""

    def __init__(self, max_pixels: int):
        self.max_pixels, self.proc, self.restarts = max_pixels, None, 0
        self._start()

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_decode_worker, args=(child, self.max_pixels), daemon=True)
        self.proc.start()
        child.close()

    def decode(self, data: bytes, timeout: float) -> tuple[str, str | None, float]:
        self.conn.send_bytes(data)
        if not self.conn.poll(timeout):
            self._restart()
            return "crash", f"no answer in {timeout:.0f} s", timeout * 1000
        try:
            return self.conn.recv()
        except (EOFError, ConnectionError):
            self.proc.join(10)
            code = self.proc.exitcode
            self._restart()
            return "crash", f"the decoding process died (exit code {code})", 0.0

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        self.conn.close()
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


class RssSampler:
    """Peak resident memory of a process, sampled every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
