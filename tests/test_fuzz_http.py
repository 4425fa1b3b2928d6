"""Fuzzed files POSTed to `/api/v1/predict` over HTTP (the reliability suite's fuzzing), and
decompression bombs refused there in under a second, by a viewer of this module's own over the
session's trained project. Each response is held to the contract in tests/fuzz_support.py. The
figures go to tests/reliability.record().
"""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures import bad_files as bf
from tests.fuzz_bombs import _may_decode, _timed, bombs
from tests.fuzz_mutations import delete_range, flip_bits, insert_bytes, mutated_files, set_integer, truncate
from tests.fuzz_seeds import seed_files
from tests.fuzz_support import (BOMB_SECONDS, CASE_SECONDS, FORBIDDEN, LONG, RSS_GROWTH_MB, RSS_PEAK_MB, SHORT,
                                RssSampler, _files, _settings, check_message)
from tests.reliability import record
from tests.viewer_support import PASSWORD, USER, start_viewer, trained_project

pytestmark = [pytest.mark.usefixtures("hypothesis_home"),
              pytest.mark.filterwarnings("ignore::ResourceWarning")]

FILENAMES = ("image.png", "film.dcm", "ZEBEDEE_MARGARETHE.dcm", "../../../etc/passwd", "/tmp/x.jpg",
             "C:\\Users\\x\\scan.dcm", "name with spaces.jpeg", "\u00e9t\u00e9.png", "a" * 300, "")
HTTP_OK = {200, 400, 413, 415, 422}


@pytest.fixture(scope="module")
def fuzz_viewer(tmp_path_factory):
    """A viewer of its own over the session's trained project, with a private TMPDIR, so that every
    file it writes anywhere temporary is seen and its memory is this module's alone."""
    private = tmp_path_factory.mktemp("viewer-tmpdir")
    viewer = start_viewer(trained_project(), f"fuzz-{os.getpid()}", extra_env={"TMPDIR": str(private)})
    viewer.private_tmp = private
    try:
        yield viewer
    finally:
        viewer.stop()


def _strip_images(body):
    """The response without its base64 PNGs (base64 text may spell '/tmp' by chance)."""
    if isinstance(body, dict):
        return {k: "<png>" if k.endswith("_png") and isinstance(v, str) else _strip_images(v)
                for k, v in body.items()}
    if isinstance(body, list):
        return [_strip_images(v) for v in body]
    return body


def check_response(r: httpx.Response, viewer) -> None:
    assert r.status_code in HTTP_OK, (r.status_code, r.text[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert "Traceback" not in r.text and 'File "' not in r.text
    text = json.dumps(_strip_images(body))
    forbidden = FORBIDDEN + (str(viewer.root), str(viewer.temp_dir), str(viewer.private_tmp))
    assert not any(s in text for s in forbidden), text[:500]
    if r.status_code == 200:
        assert body["image"]["format"] in ("png", "jpeg", "dicom", "gif", "tiff", "bmp", "webp"), body["image"]
        for p in body["predictions"]:
            assert 0.0 <= p["probability"] <= 1.0
    else:
        assert set(body) == {"error"}, body
        check_message(body["error"], (str(viewer.root),))


def _multipart(draw, data: bytes, filename: str) -> tuple[bytes, str]:
    """A hand-built multipart body and content type, then mutated (framing and headers included)."""
    boundary = "fuzzb0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode("utf-8", "surrogateescape")
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.sampled_from((flip_bits, set_integer, insert_bytes, delete_range, truncate)))(draw, body)
    ctype = draw(st.sampled_from((f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                  f"multipart/form-data; boundary={boundary[:-1]}", "multipart/form-data; boundary=",
                                  "application/octet-stream", f"multipart/form-data; boundary={'x' * 300}")))
    return body, ctype


def run_http_fuzz(n: int, viewer) -> dict:
    """n mutated files POSTed to /api/v1/predict; returns the figures measured."""
    url = viewer.url + "/api/v1/predict"
    stats = {"cases": 0, "status": {}, "max_ms": 0.0, "seeds": {}, "multipart_mutated": 0}
    log_start = viewer.log.stat().st_size
    with httpx.Client(auth=(USER, PASSWORD), timeout=60) as client:
        for data in seed_files().values():   # warm-up: every seed once, so caches and lazy imports are in place
            check_response(client.post(url, files={"file": ("seed", data)}), viewer)
        files_before = _files(viewer.temp_dir, viewer.private_tmp)
        t0 = time.perf_counter()
        with RssSampler(viewer.proc.pid) as mem:
            rss0 = mem.rss()

            @_settings(n)
            @given(case=mutated_files(), filename=st.sampled_from(FILENAMES), baseline=st.booleans(),
                   heatmaps=st.booleans(), raw=st.integers(0, 9), extra=st.data())
            def fuzz(case, filename, baseline, heatmaps, raw, extra):
                name, ops, data = case
                params = {"baseline": str(baseline).lower(), "heatmaps": str(heatmaps).lower()}
                t = time.perf_counter()
                if raw == 0:  # one case in ten: the multipart framing is damaged as well
                    body, ctype = _multipart(extra.draw, data, filename)
                    r = client.post(url, content=body, headers={"content-type": ctype}, params=params)
                    stats["multipart_mutated"] += 1
                else:
                    r = client.post(url, files={"file": (filename, data)}, params=params)
                ms = (time.perf_counter() - t) * 1000
                check_response(r, viewer)
                assert ms < CASE_SECONDS * 1000, f"{name} {ops}: {ms:.0f} ms"
                stats["cases"] += 1
                if stats["cases"] == n // 2:
                    stats["rss_mid"] = mem.rss()
                stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                stats["max_ms"] = max(stats["max_ms"], ms)
                stats["seeds"][name] = stats["seeds"].get(name, 0) + 1
                if stats["cases"] % 500 == 0:
                    assert httpx.get(viewer.url + "/api/v1/health", timeout=30).json()["status"] == "ok"

            fuzz()
            rss1 = mem.rss()
        stats["seconds"] = round(time.perf_counter() - t0, 1)
    stats["rss_start_mb"] = round(rss0 / 2**20, 1)
    stats["rss_growth_mb"] = round((rss1 - rss0) / 2**20, 1)
    stats["rss_growth_second_half_mb"] = round((rss1 - stats.pop("rss_mid")) / 2**20, 1)
    stats["rss_peak_over_start_mb"] = round((mem.peak - rss0) / 2**20, 1)
    stats["temp_files_left"] = len(_files(viewer.temp_dir, viewer.private_tmp) - files_before)
    stats["health"] = httpx.get(viewer.url + "/api/v1/health", timeout=30).json()["status"]
    log = viewer.log.read_bytes()[log_start:].decode("utf-8", "replace")
    stats["log_tracebacks"] = log.count("Traceback") + log.count("internal error")
    stats["log_leaks"] = sum(log.count(s) for s in (bf.PHI_ID, "ZEBEDEE", "MARGARETHE"))
    return stats


def _check_http_stats(stats: dict, n: int, viewer) -> None:
    assert viewer.proc.poll() is None, "the viewer died"
    assert stats["cases"] >= n, stats
    assert stats["health"] == "ok"
    assert stats["temp_files_left"] == 0, stats
    assert stats["log_tracebacks"] == 0 and stats["log_leaks"] == 0, stats
    assert stats["status"].get(200, 0) > 0 and sum(v for k, v in stats["status"].items() if k != 200) > 0, stats
    assert stats["rss_peak_over_start_mb"] < RSS_PEAK_MB, stats
    assert stats["rss_growth_mb"] < RSS_GROWTH_MB, stats


def _record_http(stats: dict, variant: str) -> None:
    record("fuzz.http_predict", variant=variant, cases=stats["cases"], crashes=0, tracebacks_or_paths=0,
           status={str(k): v for k, v in sorted(stats["status"].items())}, temp_files_left=stats["temp_files_left"],
           rss_growth_mb=stats["rss_growth_mb"], rss_growth_second_half_mb=stats["rss_growth_second_half_mb"],
           rss_peak_over_start_mb=stats["rss_peak_over_start_mb"], max_ms=round(stats["max_ms"], 1),
           seconds=stats["seconds"], multipart_mutated=stats["multipart_mutated"])


def test_http_fuzz_short(fuzz_viewer):
    stats = run_http_fuzz(SHORT["http"], fuzz_viewer)
    _check_http_stats(stats, SHORT["http"], fuzz_viewer)
    _record_http(stats, "short")


@pytest.mark.slow
def test_http_fuzz_long(fuzz_viewer):
    stats = run_http_fuzz(LONG["http"], fuzz_viewer)
    _check_http_stats(stats, LONG["http"], fuzz_viewer)
    _record_http(stats, "long")
    print(json.dumps(stats, indent=1, sort_keys=True))


def test_bombs_are_refused_quickly_over_http(fuzz_viewer):
    results, failures = {}, []
    with httpx.Client(auth=(USER, PASSWORD), timeout=60) as client:
        before = _files(fuzz_viewer.temp_dir, fuzz_viewer.private_tmp)
        for name, data in bombs().items():
            ms, r = _timed(lambda: client.post(fuzz_viewer.url + "/api/v1/predict", files={"file": ("x", data)}))
            assert isinstance(r, httpx.Response), (name, r)
            check_response(r, fuzz_viewer)
            results[name] = round(ms, 1)
            if not (400 <= r.status_code < 500 or _may_decode(name) and r.status_code == 200):
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
            if ms >= BOMB_SECONDS * 1000:
                failures.append(f"{name}: {ms:.0f} ms")
        assert _files(fuzz_viewer.temp_dir, fuzz_viewer.private_tmp) == before
    assert httpx.get(fuzz_viewer.url + "/api/v1/health").json()["status"] == "ok"
    assert not failures, failures
    record("bombs", where="http", limits="viewer", cases=len(results), max_ms=max(results.values()), ms=results)
