"""Beyond one machine: a DVC remote carries a trained cycle to a fresh clone with no recomputation,
and the refine flow has a Prefect deployment (prefect.yaml, flows/serve.py) a worker can run."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT
from tests.helpers import GIT_IDENTITY
from tests.viewer_support import trained_project

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "CXR_LOG_LEVEL": "WARNING", **GIT_IDENTITY}
# cached (pushed/pulled) outputs of cycle 0, the refinement cycle and the report
OUTPUTS = ("data/prepared", "models/unet", "models/c0", "data/cams/c1", "models/c1", "reports/index.html",
           "reports/summary.json")


def _sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _dvc(cwd: Path, *args: str) -> str:
    return _sh([sys.executable, "-m", "dvc", *args], cwd)


def _digest(path: Path) -> str:
    """md5 of a file, or of a directory's relative names and contents (DVC outs can be either)."""
    h = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def test_remote_push_then_pull_in_fresh_clone_reproduces_without_recompute(tmp_path):
    # the viewer tests' trained tiny project (cycle 0 + c1), copied so theirs stays untouched
    origin = tmp_path / "origin"
    shutil.copytree(trained_project(), origin, symlinks=True)
    assert json.loads(_dvc(origin, "status", "--json") or "{}") == {}, "source project not up to date"
    remote = tmp_path / "remote"
    _dvc(origin, "remote", "add", "-d", "store", str(remote))
    _sh(["git", "add", "-A"], origin)
    _sh(["git", "commit", "-qm", "trained cycle + remote"], origin)
    _dvc(origin, "push", "-q")
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "models" / "c1").exists()
    _dvc(clone, "pull", "-q")
    assert json.loads(_dvc(clone, "status", "--json") or "{}") == {}, "pulled clone is stale"
    out = _dvc(clone, "repro")
    assert "Running stage" not in out, out
    assert "up to date" in out, out
    for rel in OUTPUTS:
        assert _digest(clone / rel) == _digest(origin / rel), rel


def _prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_prefect_yaml_names_the_refine_flow_with_its_parameters():
    from prefect.cli.deploy._models import PrefectYamlModel  # the model `prefect deploy` validates with

    raw = _prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)
    assert model.pull and "prefect.deployments.steps.set_working_directory" in model.pull[0]
    from flows.refine import refine

    params = inspect.signature(refine.fn).parameters
    assert model.deployments
    for dep in model.deployments:
        path, _, fn = dep.entrypoint.partition(":")
        assert (ROOT / path).is_file() and fn == refine.fn.__name__, dep.entrypoint
        assert set(dep.parameters) <= set(params), dep.parameters
        assert dep.work_pool and dep.work_pool.name
        assert dep.flow_name in (None, refine.name)
        for sched in dep.schedules or []:  # shipped schedules stay off until someone turns them on
            assert getattr(sched, "active", True) is False


def test_serve_builds_a_scheduled_deployment_without_serving():
    from prefect.deployments.runner import RunnerDeployment

    from flows.serve import build_deployment, parse_args

    args = parse_args(["--cron", "0 2 * * *", "--name", "nightly", "--dask-address", "tcp://scheduler:8786"])
    dep = build_deployment(args)
    assert dep.parameters["dask_address"] == "tcp://scheduler:8786"  # the stages' shard tasks go there
    assert isinstance(dep, RunnerDeployment)
    assert dep.name == "nightly" and dep.flow_name == "cxr-refine"
    assert dep.entrypoint.endswith("flows/refine.py:refine")
    assert set(dep.parameters) == {"root", "dask_address"}  # params.yaml is read from root, as every stage does
    assert Path(dep.parameters["root"]).is_absolute()
    (schedule,) = dep.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert build_deployment(parse_args([])).schedules == []  # no --cron: run on demand only
