"""Determinism: the same seed twice on the CPU gives identical metrics and weights, and `dvc repro` on
a clean checkout changes no output.

Run 1 is the session's uninterrupted tiny project (cycle 0 + one refinement cycle). Run 2 starts from
a clean checkout of it: its git commit (code, params, dvc.yaml) plus its dvc.lock, with no output and
no DVC cache, so every stage recomputes. Afterwards dvc.lock is unchanged byte for byte, and every
output file (stores, checkpoints, metrics, reports) equals run 1's byte for byte. The checkout with a
pulled cache (no stage runs at all) is tests/test_remote_and_deploy.py's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from tests.pipeline_runs import ENV, assert_same_code, dvc_ok, lock_outs, reference_project
from tests.reliability import record


def _git(cwd: Path, *args: str) -> str:
    env = {**ENV, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def _files(root: Path, rel: str) -> list[str]:
    """An output's files (an out is a file or a directory), relative to the project."""
    path = root / rel
    if path.is_file():
        return [rel]
    return sorted(str(p.relative_to(root)) for p in path.rglob("*") if p.is_file())


def test_same_seed_twice_and_clean_checkout_repro_change_no_output(tmp_path):
    reference = reference_project()
    t0 = time.time()
    checkout = tmp_path / "checkout"
    _git(tmp_path, "clone", "-q", str(reference), str(checkout))
    shutil.copy(reference / "dvc.lock", checkout / "dvc.lock")
    _git(checkout, "add", "dvc.lock")
    _git(checkout, "commit", "-qm", "the reference run's lock")
    assert not (checkout / "models" / "c0").exists() and not any((checkout / ".dvc" / "cache").rglob("*.dir"))

    out = dvc_ok(checkout, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    stages = lock_outs(reference)
    assert ran == set(stages), f"a clean checkout must recompute every stage, ran {sorted(ran)}"
    assert_same_code(checkout, reference)

    # dvc repro on the clean checkout changed no recorded hash ...
    assert _git(checkout, "status", "--porcelain", "--", "dvc.lock") == ""
    assert (checkout / "dvc.lock").read_text() == (reference / "dvc.lock").read_text()
    assert json.loads(dvc_ok(checkout, "status", "--json") or "{}") == {}
    # ... and every output's every file is the first run's, byte for byte
    compared, differing = 0, []
    for stage, outs in stages.items():
        for rel in outs:
            ours, theirs = _files(checkout, rel), _files(reference, rel)
            assert ours == theirs, f"{stage}: {rel} holds other files"
            for f in theirs:
                compared += 1
                if (checkout / f).read_bytes() != (reference / f).read_bytes():
                    differing.append(f)
    assert not differing, differing
    weights = [f for outs in stages.values() for rel in outs for f in _files(reference, rel)
               if f.endswith(".safetensors")]
    metrics = [f for outs in stages.values() for f in outs if f.endswith("metrics.json") or f.endswith("summary.json")]
    assert any(w.startswith("models/c0/") for w in weights) and any(w.startswith("models/c1/") for w in weights)
    assert "reports/cycles/c1/metrics.json" in metrics
    for f in metrics:  # said once more for the metrics: identical values, not only identical bytes
        assert json.loads((checkout / f).read_text()) == json.loads((reference / f).read_text()), f

    again = dvc_ok(checkout, "repro")
    assert "Running stage" not in again, again
    record("determinism", runs=2, stages=len(stages), outputs_compared=sum(map(len, stages.values())),
           files_compared=compared, weights_compared=len(weights), metrics_compared=len(metrics),
           differing=len(differing), clean_checkout_changed=0, seconds=round(time.time() - t0, 1))
