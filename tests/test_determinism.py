"""Determinism: the same seed twice on the CPU gives identical metrics and weights, and `make run` on
a clean checkout changes no output that `dvc repro` wrote.

Run 1 is the session's uninterrupted tiny project (cycle 0 + two refinement cycles) through a plain
`dvc repro`. Run 2 (tests/pipeline_runs.clean_checkout_flow_run) starts from a clean checkout of it: its
git commit (code, params, dvc.yaml) plus its dvc.lock, with no output and no DVC cache, so every stage
recomputes, and runs it the way `make run` does: the Prefect flow, its shard tasks on a Dask
LocalCluster, with OMP_NUM_THREADS=1 in its environment as a Dask cluster leaves it (stages set their
own threads: compute.threads). tests/test_flow_watch.py reads the same run's logs. Afterwards
dvc.lock is unchanged byte for byte, and every output file (stores, checkpoints, metrics, reports)
equals run 1's byte for byte. The checkout with a pulled cache (no stage runs at all) is
tests/test_remote_and_deploy.py's.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from pipeline.models.checkpoint import load_tensors, sort_header_metadata
from tests.pipeline_runs import (ENV, assert_same_code, clean_checkout_flow_run, dvc_ok, lock_outs,
                                 reference_project, run_git)
from tests.reliability import record


def _files(root: Path, rel: str) -> list[str]:
    """An output's files (an out is a file or a directory), relative to the project."""
    path = root / rel
    if path.is_file():
        return [rel]
    return sorted(str(p.relative_to(root)) for p in path.rglob("*") if p.is_file())


def test_same_seed_twice_and_clean_checkout_repro_change_no_output(prefect_harness):
    reference = reference_project()
    # the reference ran on every core: the OMP_NUM_THREADS=1 below would otherwise agree with it anyway
    assert yaml.safe_load((reference / "params.yaml").read_text())["compute"]["threads"] == 0
    run = clean_checkout_flow_run()
    checkout = run.checkout
    stages = lock_outs(reference)
    assert_same_code(checkout, reference)

    # dvc repro on the clean checkout changed no recorded hash ...
    assert run_git(checkout, "status", "--porcelain", "--", "dvc.lock") == ""
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

    again = dvc_ok(checkout, "repro")  # the flow left dvc's lock complete
    assert "Running stage" not in again, again
    record("determinism", runs=2, stages=len(stages), outputs_compared=sum(map(len, stages.values())),
           files_compared=compared, weights_compared=len(weights), metrics_compared=len(metrics),
           differing=len(differing), clean_checkout_changed=0, seconds=run.seconds)


def _safetensors(meta_items: list[tuple[str, str]]) -> bytes:
    """A one-tensor safetensors file whose header lists the metadata in the given order."""
    header = {"__metadata__": dict(meta_items), "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw = raw.ljust(-(-len(raw) // 8) * 8, b" ")
    return struct.pack("<Q", len(raw)) + raw + torch.arange(4, dtype=torch.float32).numpy().tobytes()


def test_checkpoint_metadata_is_written_in_one_order(tmp_path):
    """safetensors writes its metadata map in a random order per process (safetensors#584): two runs
    saved identical checkpoints as different bytes, and dvc recorded other hashes (the clean-checkout
    test above caught it). save_tensors sorts the header's metadata."""
    path = tmp_path / "unsorted.safetensors"
    path.write_bytes(_safetensors([("cxr_sha256", "b"), ("cxr_meta", "{}")]))
    sort_header_metadata(path)
    assert path.read_bytes() == _safetensors([("cxr_meta", "{}"), ("cxr_sha256", "b")])
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"cxr_meta": "{}", "cxr_sha256": "b"}
        assert torch.equal(fh.get_tensor("w"), torch.arange(4, dtype=torch.float32))

    # and end to end: the same checkpoint saved by separate processes is the same file
    code = ("import sys, torch; from pipeline.models.checkpoint import save_tensors; "
            "save_tensors(sys.argv[1], {'w': torch.arange(6.).reshape(2, 3), 'b': torch.ones(2)}, {'arch': 'x'})")
    files = [tmp_path / f"p{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, env=ENV, timeout=120)
    assert len({f.read_bytes() for f in files}) == 1
    tensors, meta = load_tensors(files[0])  # the checksum in the rewritten header still verifies
    assert meta == {"arch": "x"} and torch.equal(tensors["b"], torch.ones(2))
