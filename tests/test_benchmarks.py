"""The benchmarks' code paths, at tiny sizes: the figures they write must be there and positive, and the
GPU bench must refuse, without writing, where there is no GPU (CPU figures must never pass for GPU ones)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import NO_CUDA
from benchmarks.input_pipeline import bench_input_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _positive(section: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert section[key] > 0, (key, section)


def test_input_pipeline_bench_tiny():
    out = bench_input_pipeline(n=16, size=32, batch=4, workers=(0, 1, 2), train_workers=(0, 2), epochs=1,
                               train_epochs=2, warmup=1)
    assert out["image_size"] == 32 and out["cores"] >= 1
    for w in (0, 1, 2):
        _positive(out["loader"][f"{w}_workers"], ("images_per_s", "first_batch_s", "timed_images"))
    for w in (0, 2):
        train = out["train"][f"{w}_workers"]
        _positive(train, ("images_per_s", "step_ms", "compute_ms", "timed_steps"))
        assert 0 <= train["wait_share"] <= 1
    assert out["train"]["images_per_s_2_workers_over_0_workers"] > 0
    assert isinstance(out["meets_targets"], bool) and out["targets"] and out["note"]


def _gpu_bench(cwd: Path, *args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"gpu": {"kept": True}}))  # real GPU figures: a dry run must leave them alone
    proc = _gpu_bench(ROOT, "--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["gpu"] == {"kept": True}
    sec = doc["gpu_dryrun_cpu"]
    assert sec["machine"]["device"] == "cpu"
    amp = sec["train"]["amp"]
    for precision in ("fp32", amp):
        _positive(sec["train"][precision], ("images_per_s", "step_ms"))
    for w in sec["workers"]:
        _positive(sec["loader"]["loader_alone"][f"{w}_workers"], ("images_per_s",))
        fed = sec["loader"]["training"][f"{w}_workers"]
        _positive(fed, ("images_per_s", "step_ms"))
        assert isinstance(fed["keeps_device_busy"], bool)
    _positive(sec["cam"], ("cam_images_per_s", "inference_fp32_images_per_s", f"inference_{amp}_images_per_s"))
    _positive(sec["viewer"], ("analyse_ms", "forward_ms"))
    _positive(sec["enhance"], ("atlas_ms_per_image", "counterfactual_ms_per_image"))
    proj = sec["projection"]
    for cycle in ("refinement_cycle", "first_cycle"):
        _positive(proj[cycle], ("train_h", "cam_h", "evaluate_h", "total_h"))
    assert proj["refinement_cycle"]["enhance_h"] > 0 and proj["assumptions"]
    assert proj["images"]["train"] + proj["images"]["val"] == proj["images"]["frontal_train_csv"]
    assert set(sec["meets_targets"]) and not any("error" in v for v in sec.values() if isinstance(v, dict))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the bench would run")
def test_gpu_bench_without_cuda_refuses_and_writes_nothing(tmp_path):
    proc = _gpu_bench(tmp_path, timeout=120)  # the default device (cuda) and output (reports/benchmarks.json)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == NO_CUDA, proc.stderr
    assert proc.stderr.count(NO_CUDA) == 1 and not proc.stdout
    assert list(tmp_path.iterdir()) == []  # no reports/ folder, no JSON


def test_scale_bench_project_has_every_source_dependency(tmp_path):
    """The 10k-film dvc bench's project: every stage input that no stage writes is there, so its `dvc
    repro` can run (a missing data/feedback once stopped `make bench` with dvc's exit 255)."""
    from dvc.repo import Repo

    from benchmarks.scale import _project

    project = _project(tmp_path / "p", patients=30)
    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)
        written = [Path(out.fs_path) for stage in stages for out in stage.outs]
        deps = {Path(dep.fs_path) for stage in stages for dep in stage.deps}
        # a source: no stage writes it, nor anything inside it (reports/cycles gathers the cycles' outs)
        sources = {d for d in deps if not any(d.is_relative_to(out) or out.is_relative_to(d) for out in written)}
    assert len(stages) > 10 and project / "data" / "feedback" in sources
    assert sorted(str(s.relative_to(project)) for s in sources if not s.exists()) == []


def test_viewer_bench_retries_what_the_inflight_limit_refuses(monkeypatch):
    """The viewer bench's concurrent clients at a limit they exceed (one held upload at a time, four
    clients): the refused requests are retried after Retry-After and counted, and every one is answered
    (a 429 once stopped `make bench`)."""
    from benchmarks.viewer import bench_viewer

    monkeypatch.setenv("CXR_MAX_INFLIGHT", "1")
    out = bench_viewer(setups=(("tinyvgg", 32, ["Pneumonia", "Cardiomegaly"]),), repeats=1, clients=4, per_client=3)
    res = out["tinyvgg@32"]
    assert res["requests"] == 12 and res["max_inflight"] == 1
    assert res["refused_429_then_retried"] > 0
    _positive(res, ("single_client_median_ms", "concurrent_p95_ms", "concurrent_throughput_per_s", "analyse_ms"))
