"""Fold the reliability suite's evidence into `reports/reliability.json` (the eight areas of
README "Reliability": seven, and the attacks on the viewer and the pipeline).

    python -m tests.reliability_report --log LOG --junit JUNIT --sanity reports/sanity.json \
        [--summary reports/summary.json] --out reports/reliability.json

Three kinds of evidence:

- the figures tests measured, one JSON line per `tests.reliability.record(check, **figures)` call
  ($CXR_RELIABILITY_LOG). Records of one check are folded into one set of figures (`fold`): counts
  (cases, kills, crashes, ...) and durations in seconds are summed, `max_*`, `*_ms`, `*_mb` figures
  keep the worst, `min_*` the least, booleans must all hold, lists are united, distinct strings
  are listed, per-key count tables (`by_*`, `status*`) are summed key by key, anything else keeps
  the latest value. Records older than the JUnit run's start are left out (a reused log);
- pytest's outcome of every test (a JUnit XML file): passed, failed (with the message), skipped
  (with the reason);
- the saliency sanity checks of the pipeline run (reports/sanity.json, written by the `sanity`
  stage) and the per-cycle `sanity_rank_corr` of reports/summary.json.

Every test and check belongs to one area (`AREA_OF_TEST`, `AREA_OF_CHECK`; first match wins).
An area passes when at least one of its tests ran and none failed, no figure it recorded says
something went wrong (`BAD_FIGURES` > 0, or a false `passed`/`ok`/`*_equal`), and — for saliency
sanity — both checks of reports/sanity.json passed. An area with no evidence is `"passed": null`
("not run"; saliency sanity without reports/sanity.json is "incomplete"). Tests outside the
areas are listed under "other". The whole report passes only when every area passed and no other
test failed. Each verdict carries its reasons.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

from pipeline.io import write_json

ROOT = Path(__file__).resolve().parents[1]

# the areas of README "Reliability", in its order, with the figure each must reach
AREAS = {
    "crash_consistency": "SIGKILL of training, each DVC stage and the Prefect flow at random points, 20 times: "
                         "the last checkpoint loads, no partial shard is visible, dvc repro completes with the "
                         "uninterrupted run's hashes, resumed training matches uninterrupted training",
    "fuzzing": ">= 10,000 mutated PNG/JPEG/DICOM cases to the decoder and to POST /api/v1/predict: 0 crashes, "
               "0 tracebacks or paths in responses, 0 temp files left, bounded memory; bombs refused in < 1 s",
    "determinism": "the same seed twice on CPU gives identical metrics and weights; dvc repro on a clean "
                   "checkout changes no output",
    "no_phi": "100 DICOM uploads and a DICOM dataset prepare with names/IDs set: none of them in logs, reports, "
              "manifests, stores or the viewer's temp dir",
    "safe_loading": "checkpoints are safetensors + JSON, never unpickled; a tampered or truncated checkpoint gives "
                    "a clear error; no torch.load without weights_only=True",
    "auth_and_routes": "every route without credentials -> 401; path traversal -> 403/404; wrong passwords "
                       "rate-limited; pip-audit finds no known advisory in the viewer stack",
    "saliency_sanity": "cascading model-parameter randomisation and label permutation drop the heatmap rank "
                       "correlation below 0.2 for the default model; a failing check is flagged",
    "attacks": "at the viewer's default limits: an upload event reads only the viewer's own uploads and "
               "cannot stall it; anonymous bodies capped (RSS < +50 MB over 20); no upload outlives SIGTERM or a "
               "restart after SIGKILL; header/body deadlines and a connection cap; REST analyses in flight capped "
               "(429); proxy headers only from trusted proxies; no timing oracle; resume, cycle-id, dataset-path "
               "and unsafe-loader attacks on the pipeline refused",
}
OTHER = "other"

# (regex on "tests/test_x.py::test_name[param]", area): first match wins
AREA_OF_TEST: list[tuple[str, str]] = [
    (r"^tests/test_(viewer|pipeline)_attacks\.py::", "attacks"),
    (r"^tests/test_sanity\.py::", "saliency_sanity"),
    (r"^tests/test_viewer_api\.py::test_model_card", "saliency_sanity"),
    (r"^tests/test_(crash_consistency|kill_resume)\.py::", "crash_consistency"),
    (r"^tests/test_determinism\.py::", "determinism"),
    (r"^tests/test_phi\.py::", "no_phi"),
    (r"^tests/test_(fuzz_\w+|prepare_hostile)\.py::", "fuzzing"),
    (r"^tests/test_security_(checkpoints|lint)\.py::", "safe_loading"),
    (r"^tests/test_(security_auth|advisories)\.py::", "auth_and_routes"),
    (r"^tests/test_viewer_api\.py::.*(identifier|phi)", "no_phi"),
    (r"^tests/test_viewer_api\.py::.*(login|anonymous|password|api_docs|workspace|users_file|auth)",
     "auth_and_routes"),
    (r"^tests/test_viewer_api\.py::.*(bad_files|request_errors)", "fuzzing"),
]
# (regex on the recorded check's name, area)
AREA_OF_CHECK: list[tuple[str, str]] = [
    (r"^attacks", "attacks"),
    (r"^crash_consistency", "crash_consistency"),
    (r"^(fuzz|bombs)", "fuzzing"),
    (r"^determinism", "determinism"),
    (r"^phi", "no_phi"),
    (r"^safe_loading", "safe_loading"),
    (r"^(auth|pip_audit)", "auth_and_routes"),
    (r"^saliency_sanity", "saliency_sanity"),
]

# a recorded figure under one of these names above 0 means something went wrong
BAD_FIGURES = {"crashes", "tracebacks", "traceback", "tracebacks_or_paths", "leaked", "leaks", "paths_leaked",
               "unpickled", "violations", "advisories", "hash_mismatches", "differing", "clean_checkout_changed",
               "partial_shards_visible", "temp_files_left", "phi_found", "phi_hits", "identifiers_found",
               "anonymous_allowed", "failures"}
_SUMMED = re.compile(r"(^|_)(cases|kills|crashes|tracebacks?|refused|decoded|attempts|leaked|leaks|unpickled|"
                     r"violations|advisories|mismatches|differing|changed|visible|left|mutated|runs|hits|"
                     r"failures|errors|uploads|seconds|found)($|_)")
_WORST = re.compile(r"(^max_|_max$|peak|_mb$|_ms$)")
_COUNT_TABLE = re.compile(r"^(by_|status)")
_MUST_HOLD = re.compile(r"^(passed|ok)$|_(equal|ok|passed)$")


# ----------------------------------------------------------------------------------------- figures

def _fold_value(key: str, old, new):
    if isinstance(new, bool) or isinstance(old, bool):
        return bool(old) and bool(new)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        if key.startswith("min_") or key.endswith("_min"):
            return min(old, new)
        if _WORST.search(key):
            return max(old, new)
        if _SUMMED.search(key):
            return old + new
        return new
    if isinstance(old, dict) and isinstance(new, dict):
        if _COUNT_TABLE.search(key):
            out = dict(old)
            for k, v in new.items():
                out[k] = out[k] + v if isinstance(out.get(k), (int, float)) and isinstance(v, (int, float)) \
                    and not isinstance(v, bool) else v
            return out
        return {**old, **new}
    if isinstance(old, list) and isinstance(new, list):
        return old + [v for v in new if v not in old]
    if isinstance(old, str) and isinstance(new, str):
        return old if old == new else sorted({old, new})
    if isinstance(old, list) and isinstance(new, str):
        return old if new in old else sorted({*old, new})
    return new


def fold(records: list[dict]) -> dict:
    """One check's records (in time order) folded into one set of figures (see the module docstring)."""
    out: dict = {}
    for rec in records:
        for key, value in rec.items():
            if key in ("check", "time"):
                continue
            out[key] = _fold_value(key, out[key], value) if key in out else value
    out["records"] = len(records)
    return out


def read_log(path: Path | None, since: float | None = None) -> tuple[dict[str, dict], dict]:
    """{check: folded figures} from a JSON-lines log, and what was read (records, stale, unreadable)."""
    info = {"path": str(path) if path else None, "records": 0, "stale_records": 0, "unreadable_lines": 0}
    by_check: dict[str, list[dict]] = {}
    if path is None or not Path(path).is_file():
        return {}, info
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            check = str(rec["check"])
        except (ValueError, KeyError, TypeError):
            info["unreadable_lines"] += 1
            continue
        if since is not None and isinstance(rec.get("time"), (int, float)) and rec["time"] < since:
            info["stale_records"] += 1
            continue
        info["records"] += 1
        by_check.setdefault(check, []).append(rec)
    return {check: fold(sorted(recs, key=lambda r: r.get("time") or 0)) for check, recs in by_check.items()}, info


def bad_figures(check: str, figures: dict) -> list[str]:
    """Why a check's recorded figures say it failed (empty when they do not)."""
    reasons = []
    for key, value in figures.items():
        if key in BAD_FIGURES and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            reasons.append(f"{check}: {key} = {value}")
        elif _MUST_HOLD.search(key) and value is False:
            reasons.append(f"{check}: {key} is false")
    return reasons


# ------------------------------------------------------------------------------------------- junit

def _test_id(case: ET.Element) -> str:
    """pytest's junit `classname` (tests.test_x or tests.test_x.TestClass) + `name` -> tests/test_x.py::name."""
    parts = (case.get("classname") or "").split(".")
    i = next((k for k, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    module = "/".join(parts[: i + 1]) + ".py"
    return "::".join([module, *parts[i + 1:], case.get("name") or "?"])


def read_junit(path: Path | None) -> tuple[list[dict], dict]:
    """Every test's outcome, and the run's start time and totals."""
    info: dict = {"path": str(path) if path else None, "started": None, "seconds": None}
    if path is None or not Path(path).is_file():
        return [], info
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tests = []
    for suite in suites:
        if suite.get("timestamp") and info["started"] is None:
            try:
                info["started"] = dt.datetime.fromisoformat(suite.get("timestamp")).timestamp()
            except ValueError:
                pass
        info["seconds"] = (info["seconds"] or 0.0) + float(suite.get("time") or 0.0)
        for case in suite.iter("testcase"):
            outcome, detail = "passed", None
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    detail = el.get("message") or ((el.text or "").strip().splitlines() or [""])[-1]
                    break
            tests.append({"test": _test_id(case), "outcome": outcome, "seconds": float(case.get("time") or 0.0),
                          **({"message": detail[:500]} if detail else {})})
    return tests, info


def area_of(name: str, rules: list[tuple[str, str]]) -> str:
    return next((area for pattern, area in rules if re.search(pattern, name)), OTHER)


# ----------------------------------------------------------------------------------------- sanity

def read_sanity(sanity_path: Path | None, summary_path: Path | None) -> tuple[dict | None, list[str]]:
    """The saliency figures of the pipeline run, and the reasons they fail (empty when both checks passed)."""
    if sanity_path is None or not Path(sanity_path).is_file():
        return None, []
    s = json.loads(Path(sanity_path).read_text())
    casc, lp = s.get("cascading_randomization") or {}, s.get("label_permutation") or {}
    figures = {
        "served_cycle": s.get("served_cycle"), "max": s.get("max"), "n_images": s.get("n_images"),
        "cascading_randomization": {k: casc.get(k) for k in ("cycle", "final_rank_corr", "passed", "reason",
                                                               "by_cycle")},
        "label_permutation": {k: lp.get(k) for k in ("cycle", "rank_corr", "passed", "reason", "by_cycle", "epochs",
                                                       "seed", "n_maps", "twin_val_loss", "prevalence_val_loss",
                                                       "twin_val_auroc", "untrained_val_auroc")},
    }
    if summary_path is not None and Path(summary_path).is_file():
        summary = json.loads(Path(summary_path).read_text())
        figures["sanity_rank_corr_per_cycle"] = {f"c{c['cycle']}": c.get("sanity_rank_corr")
                                                 for c in summary.get("cycles", [])}
    reasons = []
    for name, check in (("cascading randomisation", casc), ("label permutation", lp)):
        if check.get("passed") is not True:
            reasons.append(check.get("reason") or f"{name}: not run")
    return figures, reasons


# ----------------------------------------------------------------------------------------- report

def _environment() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": version("torch"), "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
    }


def build_report(log: Path | None, junit: Path | None, sanity: Path | None, summary: Path | None = None) -> dict:
    tests, junit_info = read_junit(junit)
    since = junit_info["started"] - 60 if junit_info["started"] is not None else None  # clock slack
    checks, log_info = read_log(log, since)
    sanity_figures, sanity_reasons = read_sanity(sanity, summary)

    groups: dict[str, dict] = {a: {"tests": [], "checks": {}} for a in (*AREAS, OTHER)}
    for t in tests:
        groups[area_of(t["test"], AREA_OF_TEST)]["tests"].append(t)
    for check, figures in sorted(checks.items()):
        groups[area_of(check, AREA_OF_CHECK)]["checks"][check] = figures

    areas = {}
    for area, g in groups.items():
        counts = {k: sum(t["outcome"] == k for t in g["tests"]) for k in ("passed", "failed", "error", "skipped")}
        reasons = [f"test failed: {t['test']}" + (f" ({t['message']})" if t.get("message") else "")
                   for t in g["tests"] if t["outcome"] in ("failed", "error")]
        for check, figures in g["checks"].items():
            reasons += bad_figures(check, figures)
        entry: dict = {"target": AREAS.get(area)} if area in AREAS else {}
        caveats = [f"{check}: {c}" for check, figures in g["checks"].items()
                   for c in ([figures["caveat"]] if isinstance(figures.get("caveat"), str) else figures.get("caveat") or [])]
        if caveats:  # what a passing area could not cover (said beside the verdict, never hidden in it)
            entry["caveats"] = caveats
        missing = None
        if area == "saliency_sanity":
            entry["pipeline_run"] = sanity_figures
            reasons += sanity_reasons
            if sanity_figures is None:
                missing = f"incomplete: {sanity or 'reports/sanity.json'} not found (run `make run` first)"
        evidence = counts["passed"] or g["checks"] or (area == "saliency_sanity" and sanity_figures)
        if reasons:
            passed = False
        elif missing or not evidence:
            passed = None
            skipped = [t for t in g["tests"] if t["outcome"] == "skipped"]
            reasons.append(missing or ("not run" + (": every test skipped" if skipped else ": no test and no figure")))
        else:
            passed = True
        if area == OTHER and not g["tests"] and not g["checks"]:
            continue
        areas[area] = {
            "passed": passed, "reason": "; ".join(reasons) or None, **entry,
            "tests": {**counts, "seconds": round(sum(t["seconds"] for t in g["tests"]), 1)},
            "failed": [t for t in g["tests"] if t["outcome"] in ("failed", "error")],
            "skipped": [{"test": t["test"], "reason": t.get("message")} for t in g["tests"] if t["outcome"] == "skipped"],
            "checks": g["checks"],
        }
    failing = [a for a, v in areas.items() if v["passed"] is False]
    not_run = [a for a in AREAS if areas[a]["passed"] is None]
    reason = "; ".join(([f"failed: {', '.join(failing)}"] if failing else [])
                       + ([f"not run: {', '.join(not_run)}"] if not_run else [])) or None
    return {
        "passed": not failing and not not_run,
        "reason": reason,
        "areas": areas,
        "tests": {"total": len(tests), **{k: sum(t["outcome"] == k for t in tests)
                                          for k in ("passed", "failed", "error", "skipped")},
                  "seconds": junit_info["seconds"]},
        "sources": {"log": log_info, "junit": {k: junit_info[k] for k in ("path", "seconds")},
                    "sanity": str(sanity) if sanity else None, "summary": str(summary) if summary else None},
        "environment": _environment(),
    }


def format_table(report: dict) -> str:
    lines = [f"{'area':<18} {'verdict':<8} {'tests (pass/fail/skip)':<24} reason"]
    for area, v in report["areas"].items():
        verdict = {True: "pass", False: "FAIL", None: "not run"}[v["passed"]]
        t = v["tests"]
        counts = f"{t['passed']}/{t['failed'] + t['error']}/{t['skipped']}"
        note = v["reason"] or ("; ".join(v["caveats"]) if v.get("caveats") else "")
        lines.append(f"{area:<18} {verdict:<8} {counts:<24} {note[:160]}")
    lines.append(f"overall: {'pass' if report['passed'] else 'FAIL'}" + (f" ({report['reason']})" if report["reason"]
                                                                          else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability_report", description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, help="the JSON lines of tests.reliability.record ($CXR_RELIABILITY_LOG)")
    parser.add_argument("--junit", type=Path, help="pytest --junitxml output of the reliability run")
    parser.add_argument("--sanity", type=Path, default=Path("reports/sanity.json"))
    parser.add_argument("--summary", type=Path, default=None, help="reports/summary.json (default: beside --sanity)")
    parser.add_argument("--out", type=Path, default=Path("reports/reliability.json"))
    args = parser.parse_args(argv)
    summary = args.summary or (args.sanity.parent / "summary.json" if args.sanity else None)
    report = build_report(args.log, args.junit, args.sanity, summary)
    write_json(args.out, report)  # atomic: a reader never sees half a report
    sys.stdout.write(format_table(report) + f"\nwritten: {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
