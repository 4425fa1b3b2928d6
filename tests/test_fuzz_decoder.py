"""Fuzzed files fed to the decoder (the reliability suite's fuzzing): hypothesis' mutated PNG, JPEG
and DICOM files (tests/fuzz_mutations.py), and a deterministic sweep that sets every tabled field
value one at a time. Each case is decoded in a child process (tests/fuzz_support.DecoderProcess)
and held to the contract in tests/fuzz_support.py. The figures go to tests/reliability.record().
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given

from tests.fuzz_mutations import (DICOM_SOF, DICOM_TAGS, JPEG_SOF, PNG_IHDR, SYNTAXES, _set_syntax, dicom_set,
                                  dicom_sof, jpeg_set_sof, mutated_files, png_set_ihdr)
from tests.fuzz_seeds import seed_files, to_deflated
from tests.fuzz_support import (CASE_SECONDS, LONG, RSS_GROWTH_MB, RSS_PEAK_MB, SHORT, VIEWER_MAX_PIXELS,
                                DecoderProcess, RssSampler, _files, _settings, check_message)
from tests.reliability import record

pytestmark = [pytest.mark.usefixtures("hypothesis_home"),
              pytest.mark.filterwarnings("ignore::ResourceWarning")]


def run_decoder_fuzz(n: int, tmp: Path, monkeypatch) -> dict:
    """n mutated files through decode() in a worker process with a private TMPDIR; returns the
    figures measured."""
    private = tmp / "tmpdir"
    private.mkdir()
    monkeypatch.setenv("TMPDIR", str(private))  # inherited by the worker
    stats = {"cases": 0, "decoded": 0, "refused": 0, "max_ms": 0.0, "seeds": {}, "ops": {}}
    worker = DecoderProcess(VIEWER_MAX_PIXELS)
    try:
        for data in seed_files().values():  # warm-up: imports and plugin look-ups done once
            assert worker.decode(data, 60)[0] == "decoded"
        t0 = time.perf_counter()
        with RssSampler(worker.proc.pid) as mem:
            rss0 = mem.rss()

            @_settings(n)
            @given(case=mutated_files())
            def fuzz(case):
                name, ops, data = case
                outcome, detail, ms = worker.decode(data, CASE_SECONDS * 4)
                assert outcome in ("decoded", "refused"), f"{name} {ops}: {outcome}: {detail}"
                if outcome == "refused":
                    check_message(detail, (str(private),))
                assert ms < CASE_SECONDS * 1000, f"{name} {ops}: {ms:.0f} ms"
                stats["cases"] += 1
                if stats["cases"] == n // 2:
                    stats["rss_mid"] = mem.rss()
                stats[outcome] += 1
                stats["max_ms"] = max(stats["max_ms"], ms)
                stats["seeds"][name] = stats["seeds"].get(name, 0) + 1
                for op in ops:
                    stats["ops"][op] = stats["ops"].get(op, 0) + 1

            fuzz()
            rss1 = mem.rss()
        stats["seconds"] = round(time.perf_counter() - t0, 1)
        stats["rss_growth_mb"] = round((rss1 - rss0) / 2**20, 1)
        stats["rss_growth_second_half_mb"] = round((rss1 - stats.pop("rss_mid")) / 2**20, 1)
        stats["rss_peak_over_start_mb"] = round((mem.peak - rss0) / 2**20, 1)
        stats["worker_restarts"] = worker.restarts
    finally:
        worker.close()
    stats["temp_files_left"] = len(_files(private))
    return stats


def _check_decoder_stats(stats: dict, n: int, every_seed: bool) -> None:
    assert stats["cases"] >= n, stats          # hypothesis ran every case asked for
    assert stats["temp_files_left"] == 0 and stats["worker_restarts"] == 0, stats
    assert stats["rss_peak_over_start_mb"] < RSS_PEAK_MB and stats["rss_growth_mb"] < RSS_GROWTH_MB, stats
    assert stats["decoded"] > 0 and stats["refused"] > 0, stats   # the mutations both break and spare files
    if every_seed:  # (a few hundred cases need not draw all of them)
        assert set(stats["seeds"]) == set(seed_files()), stats["seeds"]


def _record_decoder(stats: dict, variant: str) -> None:
    record("fuzz.decoder", variant=variant, cases=stats["cases"], crashes=0, tracebacks=0,
           decoded=stats["decoded"], refused=stats["refused"], temp_files_left=stats["temp_files_left"],
           max_ms=round(stats["max_ms"], 1), seconds=stats["seconds"], rss_growth_mb=stats["rss_growth_mb"],
           rss_growth_second_half_mb=stats["rss_growth_second_half_mb"],
           rss_peak_over_start_mb=stats["rss_peak_over_start_mb"], formats=sorted(stats["seeds"]),
           mutations=sorted(stats["ops"]))


def test_decoder_fuzz_short(tmp_path, monkeypatch):
    stats = run_decoder_fuzz(SHORT["decoder"], tmp_path, monkeypatch)
    _check_decoder_stats(stats, SHORT["decoder"], every_seed=False)
    _record_decoder(stats, "short")


@pytest.mark.slow
def test_decoder_fuzz_long(tmp_path, monkeypatch):
    stats = run_decoder_fuzz(LONG["decoder"], tmp_path, monkeypatch)
    _check_decoder_stats(stats, LONG["decoder"], every_seed=True)
    _record_decoder(stats, "long")
    print(json.dumps(stats, indent=1, sort_keys=True))


def single_field_cases():
    """Every value of the field tables above, one field at a time, in every seed it applies to: the
    systematic complement to the random cases (it is what found gdcm's aborts first)."""
    seeds = seed_files()
    for name, data in seeds.items():
        kind = name.split("_")[0]
        if kind == "png":
            for field, (_, values) in PNG_IHDR.items():
                for v in values:
                    yield f"{name} IHDR {field}={v}", png_set_ihdr(data, field, v)
        elif kind == "jpeg":
            for field, (_, _, values) in JPEG_SOF.items():
                for v in values:
                    yield f"{name} SOF {field}={v}", jpeg_set_sof(data, field, v)
        elif kind == "dicom":
            plain = seeds["dicom_mono2"] if name == "dicom_deflated" else data
            wrap = to_deflated if name == "dicom_deflated" else (lambda b: b)
            for keyword, (_, values) in DICOM_TAGS.items():
                for v in values:
                    yield f"{name} {keyword}={v!r}", wrap(dicom_set(plain, keyword, v))
            for uid in SYNTAXES:
                yield f"{name} TransferSyntaxUID={uid!r}", _set_syntax(data, uid)
            if name in DICOM_SOF:
                for field, (_, _, values) in JPEG_SOF.items():
                    for v in values:
                        yield f"{name} frame SOF {field}={v}", dicom_sof(name, field, v)


def test_every_single_field_change_is_refused_or_decoded(tmp_path, monkeypatch):
    private = tmp_path / "tmpdir"
    private.mkdir()
    monkeypatch.setenv("TMPDIR", str(private))
    worker = DecoderProcess(VIEWER_MAX_PIXELS)
    outcomes, failures, max_ms = {"decoded": 0, "refused": 0}, [], 0.0
    t0 = time.perf_counter()
    try:
        for label, data in single_field_cases():
            outcome, detail, ms = worker.decode(data, CASE_SECONDS * 4)
            max_ms = max(max_ms, ms)
            if outcome not in outcomes or ms >= CASE_SECONDS * 1000:
                failures.append(f"{label}: {outcome} {detail} {ms:.0f} ms")
                continue
            if outcome == "refused":
                check_message(detail, (str(private),))
            outcomes[outcome] += 1
    finally:
        worker.close()
    assert not failures, failures[:20]
    assert not _files(private)
    cases = sum(outcomes.values())
    record("fuzz.single_field", cases=cases, crashes=0, max_ms=round(max_ms, 1),
           seconds=round(time.perf_counter() - t0, 1), **outcomes)
