"""tests/reliability_report.py on fabricated evidence: areas, verdicts, reasons, folding, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.reliability import LOG_ENV, record
from tests.reliability_report import AREAS, build_report, fold, main

T0 = time.time()


def _junit(path, cases: list[tuple[str, str, str | None]], started: float = T0 - 5) -> None:
    """cases: (tests/test_x.py::name, outcome, message); written the way pytest writes --junitxml."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    body = []
    for test, outcome, message in cases:
        module, name = test.split("::", 1)
        classname = module.removesuffix(".py").replace("/", ".")
        inner = {"passed": "", "failed": f'<failure message="{message}">Traceback ...</failure>',
                 "error": f'<error message="{message}">boom</error>',
                 "skipped": f'<skipped type="pytest.skip" message="{message}">{module}:1: {message}</skipped>'}[outcome]
        body.append(f'<testcase classname="{classname}" name="{name}" time="1.5">{inner}</testcase>')
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" '
                    f'failures="0" skipped="0" tests="{len(cases)}" time="{1.5 * len(cases)}" '
                    f'timestamp="{stamp}" hostname="h">{"".join(body)}</testsuite></testsuites>')


def _log(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps({"time": T0, **r}) + "\n" for r in records))


def _sanity(path, perm_rho: float = 0.03, casc_rho: float = -0.01) -> None:
    def check(rho):
        ok = rho < 0.2
        return {"cycle": 3, "passed": ok, "reason": None if ok else f"rank correlation {rho:.3f} >= 0.2 at cycle 3",
                "by_cycle": {"c0": 0.0, "c3": rho}}
    path.write_text(json.dumps({
        "served_cycle": 3, "max": 0.2, "n_images": 16, "cam_method": "gradcam",
        "cascading_randomization": {**check(casc_rho), "final_rank_corr": casc_rho},
        "label_permutation": {**check(perm_rho), "rank_corr": perm_rho, "epochs": 10, "seed": 0,
                              "twin_val_auroc": 0.5, "twin_val_loss": 0.59,
                              "prevalence_val_loss": 0.588, "n_maps": 64},
        "passed": perm_rho < 0.2 and casc_rho < 0.2}))
    (path.parent / "summary.json").write_text(json.dumps({"cycles": [{"cycle": 0, "sanity_rank_corr": 0.0},
                                                                     {"cycle": 3, "sanity_rank_corr": casc_rho}]}))


ALL_PASSING = [
    ("tests/test_crash_consistency.py::test_sigkill_flow_shard_writer_and_training", "passed", None),
    ("tests/test_fuzz_decoder.py::test_decoder_fuzz_short", "passed", None),
    ("tests/test_determinism.py::test_same_seed_twice_and_clean_checkout_repro_change_no_output", "passed", None),
    ("tests/test_phi.py::test_dicom_uploads_leave_no_phi", "passed", None),
    ("tests/test_security_checkpoints.py::test_tampered_classifier_checkpoints_are_refused_by_name", "passed", None),
    ("tests/test_security_auth.py::test_every_registered_route_refuses_an_anonymous_request", "passed", None),
    ("tests/test_sanity.py::test_permuted_label_twin_gives_low_correlation", "passed", None),
    ("tests/test_viewer_api.py::test_model_card", "passed", None),
    ("tests/test_viewer_api.py::test_prediction_schema", "passed", None),
    ("tests/test_viewer_attacks.py::test_an_upload_event_reads_only_a_file_uploaded_to_the_viewer", "passed", None),
]


@pytest.fixture
def evidence(tmp_path):
    log, junit, sanity = tmp_path / "log.jsonl", tmp_path / "junit.xml", tmp_path / "reports" / "sanity.json"
    sanity.parent.mkdir()
    _log(log, [{"check": "fuzz.decoder", "variant": "short", "cases": 300, "crashes": 0, "max_ms": 40.0,
                "formats": ["png", "dicom"]},
               {"check": "fuzz.decoder", "variant": "long", "cases": 10000, "crashes": 0, "max_ms": 95.5,
                "formats": ["jpeg", "png"]},
               {"check": "auth.routes", "routes": 12, "anonymous_401": 11},
               {"check": "safe_loading.lint", "files": 80, "violations": 0},
               {"check": "crash_consistency", "kills": 20, "by_target": {"train": 8, "flow": 12}},
               {"check": "attacks.upload_event_paths", "cases": 10, "leaked": 0}])
    _junit(junit, ALL_PASSING)
    _sanity(sanity)
    return log, junit, sanity


def test_everything_passing(evidence):
    log, junit, sanity = evidence
    r = build_report(log, junit, sanity, sanity.parent / "summary.json")
    assert r["passed"] is True and r["reason"] is None
    assert list(r["areas"])[:8] == list(AREAS) and set(r["areas"]) == {*AREAS, "other"}
    assert all(r["areas"][a]["passed"] is True for a in r["areas"])
    fuzz = r["areas"]["fuzzing"]["checks"]["fuzz.decoder"]
    assert fuzz["cases"] == 10300 and fuzz["max_ms"] == 95.5 and fuzz["crashes"] == 0 and fuzz["records"] == 2
    assert fuzz["variant"] == ["long", "short"] and set(fuzz["formats"]) == {"png", "dicom", "jpeg"}
    assert r["areas"]["auth_and_routes"]["checks"]["auth.routes"]["routes"] == 12
    assert r["areas"]["safe_loading"]["tests"]["passed"] == 1 and r["areas"]["auth_and_routes"]["tests"]["passed"] == 1
    s = r["areas"]["saliency_sanity"]
    assert s["tests"]["passed"] == 2  # the unit test and the viewer's model card
    assert s["pipeline_run"]["label_permutation"]["rank_corr"] == 0.03
    assert s["pipeline_run"]["sanity_rank_corr_per_cycle"] == {"c0": 0.0, "c3": -0.01}
    assert r["areas"]["other"]["tests"]["passed"] == 1  # test_prediction_schema belongs to no area
    assert r["areas"]["attacks"]["checks"]["attacks.upload_event_paths"]["cases"] == 10
    env = r["environment"]
    assert env["python"] and env["cpu_count"] and env["date"] and "git_commit" in env and "torch" in env
    assert r["tests"] == {"total": len(ALL_PASSING), "passed": len(ALL_PASSING), "failed": 0, "error": 0,
                          "skipped": 0, "seconds": pytest.approx(1.5 * len(ALL_PASSING))}


def test_a_failed_test_fails_its_area_and_the_report(evidence):
    log, junit, sanity = evidence
    cases = [c if "test_fuzz" not in c[0] else (c[0], "failed", "AssertionError: 3 crashes") for c in ALL_PASSING]
    _junit(junit, cases + [("tests/test_fuzz_http.py::test_http_fuzz_long", "skipped", "needs a trained project")])
    r = build_report(log, junit, sanity)
    fuzz = r["areas"]["fuzzing"]
    assert fuzz["passed"] is False and "test_decoder_fuzz_short" in fuzz["reason"] and "3 crashes" in fuzz["reason"]
    assert fuzz["failed"][0]["message"] == "AssertionError: 3 crashes"
    assert fuzz["skipped"] == [{"test": "tests/test_fuzz_http.py::test_http_fuzz_long",
                                "reason": "needs a trained project"}]
    assert fuzz["tests"]["failed"] == 1 and fuzz["tests"]["skipped"] == 1
    assert r["passed"] is False and "fuzzing" in r["reason"]
    assert r["areas"]["determinism"]["passed"] is True


def test_a_failing_sanity_check_is_flagged(evidence):
    log, junit, sanity = evidence
    _sanity(sanity, perm_rho=0.41)
    r = build_report(log, junit, sanity)
    s = r["areas"]["saliency_sanity"]
    assert s["passed"] is False and "0.410 >= 0.2" in s["reason"]
    assert s["pipeline_run"]["label_permutation"]["passed"] is False
    assert r["passed"] is False and "saliency_sanity" in r["reason"]
    _sanity(sanity, casc_rho=0.5)
    assert "0.500" in build_report(log, junit, sanity)["areas"]["saliency_sanity"]["reason"]


def test_a_bad_recorded_figure_fails_its_area(evidence):
    log, junit, sanity = evidence
    _log(log, [{"check": "phi.viewer_uploads", "uploads": 100, "leaked": 2},
               {"check": "determinism", "resumed_weights_equal": False}])
    r = build_report(log, junit, sanity)
    assert r["areas"]["no_phi"]["passed"] is False and "phi.viewer_uploads: leaked = 2" in r["areas"]["no_phi"]["reason"]
    assert "resumed_weights_equal is false" in r["areas"]["determinism"]["reason"]


def test_a_caveat_is_shown_beside_a_passing_verdict(evidence):
    """What a check could not cover (pip-audit offline: packages older than their latest release) is
    reported with the area, in the JSON and the printed table, without turning a pass into a fail."""
    from tests.reliability_report import format_table

    log, junit, sanity = evidence
    _log(log, [{"check": "pip_audit", "packages": 71, "audited": 54, "not_audited": 17, "advisories": 0,
                "caveat": "17 of 71 packages not audited"}])
    r = build_report(log, junit, sanity)
    auth = r["areas"]["auth_and_routes"]
    assert auth["passed"] is True and auth["reason"] is None
    assert auth["caveats"] == ["pip_audit: 17 of 71 packages not audited"]
    assert "caveats" not in r["areas"]["fuzzing"]
    assert "pip_audit: 17 of 71 packages not audited" in format_table(r)
    _log(log, [{"check": "pip_audit", "advisories": 1, "caveat": "partial"}])
    assert build_report(log, junit, sanity)["areas"]["auth_and_routes"]["passed"] is False


def test_missing_evidence_is_not_a_pass(evidence, tmp_path):
    log, junit, sanity = evidence
    _junit(junit, [c for c in ALL_PASSING if "test_phi" not in c[0]]
           + [("tests/test_phi.py::test_prepare", "skipped", "no DICOM fixtures")])
    r = build_report(log, junit, tmp_path / "nowhere" / "sanity.json")
    assert r["areas"]["no_phi"]["passed"] is None and "every test skipped" in r["areas"]["no_phi"]["reason"]
    s = r["areas"]["saliency_sanity"]
    assert s["passed"] is None and "not found" in s["reason"] and s["pipeline_run"] is None
    assert r["passed"] is False and "not run: no_phi, saliency_sanity" in r["reason"]
    only_run = build_report(None, None, sanity)  # the pipeline's figures alone are evidence
    assert only_run["areas"]["saliency_sanity"]["passed"] is True and only_run["areas"]["fuzzing"]["passed"] is None
    empty = build_report(None, None, None)
    assert empty["passed"] is False and all(v["passed"] is None for v in empty["areas"].values())


def test_records_from_before_the_run_are_left_out(evidence):
    log, junit, sanity = evidence
    with log.open("a") as fh:
        fh.write(json.dumps({"check": "fuzz.decoder", "time": T0 - 3600, "cases": 5, "crashes": 7}) + "\n")
        fh.write("not json\n")
    r = build_report(log, junit, sanity)
    assert r["areas"]["fuzzing"]["passed"] is True and r["areas"]["fuzzing"]["checks"]["fuzz.decoder"]["cases"] == 10300
    assert r["sources"]["log"]["stale_records"] == 1 and r["sources"]["log"]["unreadable_lines"] == 1


def test_fold_rules():
    f = fold([{"check": "x", "time": 1, "cases": 3, "max_ms": 5.0, "min_free_mb": 10, "seconds": 1.5, "ok": True,
               "where": "decoder", "status": {"400": 2}, "ms": {"a": 1}, "window_s": 60},
              {"check": "x", "time": 2, "cases": 4, "max_ms": 2.0, "min_free_mb": 7, "seconds": 2.0, "ok": False,
               "where": "http", "status": {"400": 1, "413": 5}, "ms": {"b": 2}, "window_s": 30}])
    assert f == {"cases": 7, "max_ms": 5.0, "min_free_mb": 7, "seconds": 3.5, "ok": False, "where": ["decoder", "http"],
                 "status": {"400": 3, "413": 5}, "ms": {"a": 1, "b": 2}, "window_s": 30, "records": 2}


def test_the_cli_writes_the_report_atomically(evidence, tmp_path):
    log, junit, sanity = evidence
    out = tmp_path / "out" / "reliability.json"
    assert main(["--log", str(log), "--junit", str(junit), "--sanity", str(sanity), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["passed"] is True and r["areas"]["saliency_sanity"]["pipeline_run"]["sanity_rank_corr_per_cycle"]
    assert [p.name for p in out.parent.iterdir()] == ["reliability.json"]  # no temp file left
    proc = subprocess.run([sys.executable, "-m", "tests.reliability_report", "--log", str(log), "--junit", str(junit),
                           "--sanity", str(sanity), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "overall: pass" in proc.stdout, proc.stderr


def test_record_appends_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(LOG_ENV, raising=False)
    record("fuzz.decoder", cases=1)  # a no-op
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    record("fuzz.decoder", cases=2, crashes=0)
    record("fuzz.decoder", cases=3, crashes=0)
    r = build_report(log, None, None)
    assert r["areas"]["fuzzing"]["checks"]["fuzz.decoder"]["cases"] == 5
