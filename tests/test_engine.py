"""The shard-parallel engine: Dask gives the same bytes as the in-process run, stage by stage."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flows.refine import shared_cluster
from pipeline.config import EngineParams
from pipeline.data.store import ArrayStore
from pipeline.engine import Engine, in_process, open_engine, shard_slices
from tests.conftest import tiny_params
from tests.helpers import make_project

STAGES = [("prepare", []), ("segment", []), ("cam", ["--cycle", "1"]), ("enhance", ["--cycle", "1"])]


def _square(x: int) -> int:
    return x * x


def _fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"task {x} failed")
    return x


def _digests(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != ".gitignore"}


@pytest.fixture(scope="module")
def cluster():
    with shared_cluster(EngineParams(kind="dask", workers=2), None) as address:
        yield address


def test_shards_cover_the_rows_once():
    assert shard_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert shard_slices(0, 4) == []


def test_dask_map_keeps_task_order_and_bounds_what_it_holds(cluster):
    with open_engine(EngineParams(kind="dask", address=cluster, in_flight=3)) as engine:
        assert engine.workers == 2 and "Dask at tcp://" in engine.description
        assert list(engine.map(_square, ((x,) for x in range(40)))) == [x * x for x in range(40)]
        submitted, taken = [], 0
        tasks = ((submitted.append(x) or x,) for x in range(20))
        for _ in engine.map(_square, tasks):
            taken += 1
            assert len(submitted) - taken <= 3  # never more than in_flight results outstanding
    assert list(in_process().map(_square, ((x,) for x in range(5)))) == [0, 1, 4, 9, 16]


def test_a_failing_task_stops_the_stage_with_its_own_error(cluster):
    with open_engine(EngineParams(kind="dask", address=cluster)) as engine:
        with pytest.raises(ValueError, match="task 7 failed"):
            list(engine.map(_fail_on, ((x, 7) for x in range(20))))


def test_environment_overrides_params(monkeypatch, cluster):
    monkeypatch.setenv("CXR_ENGINE", "local")
    with open_engine(EngineParams(kind="dask")) as engine:
        assert isinstance(engine, Engine) and engine.client is None
    monkeypatch.setenv("CXR_ENGINE", "dask")
    monkeypatch.setenv("CXR_DASK_ADDRESS", cluster)
    with open_engine(EngineParams(kind="local")) as engine:
        assert engine.client is not None and engine.workers == 2


def test_every_parallel_stage_is_bit_identical_on_dask(tmp_path, cluster):
    """prepare, segment (U-Net predict), cam and enhance, each re-run on a 2-worker Dask cluster over
    the in-process run's inputs: every output file has the same bytes."""
    params = tiny_params()
    params["cycles"] = {"c1": {"id": 1, "prev": 0}}
    params["data"]["shard_size"] = 24  # several shards, so tasks really are spread over both workers
    local = make_project(tmp_path / "local", params)
    run = subprocess.run([sys.executable, "-m", "dvc", "repro", "enhance@c1"], cwd=local, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = _digests(local / "data")
    shards = ArrayStore(local / "data" / "prepared" / "images")
    assert len(shards._shards) >= 4

    dask = tmp_path / "dask"
    shutil.copytree(local, dask, symlinks=True)
    for sub in ("data/prepared", "data/segment", "data/cams", "data/enhanced"):
        shutil.rmtree(dask / sub)
    env = {**os.environ, "CXR_ENGINE": "dask", "CXR_DASK_ADDRESS": cluster, "CXR_LOG_LEVEL": "INFO"}
    for stage, args in STAGES:
        proc = subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}", *args], cwd=dask, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if stage != "prepare":
            assert "Dask at tcp://" in proc.stderr, stage
    got = _digests(dask / "data")
    assert set(got) == set(reference)
    assert {k for k in reference if got[k] != reference[k]} == set()
    cams = ArrayStore(dask / "data" / "cams" / "c1")
    assert cams.dtype == np.float16 and cams.item_shape[0] == 4


def test_the_flow_shares_one_cluster_across_its_stages(monkeypatch):
    monkeypatch.delenv("CXR_ENGINE", raising=False)
    monkeypatch.delenv("CXR_DASK_ADDRESS", raising=False)
    with shared_cluster(EngineParams(kind="local"), None) as address:
        assert address is None  # in-process: no cluster, stages run their tasks themselves
    with shared_cluster(EngineParams(kind="dask", address="tcp://params:8786"), "tcp://cli:8786") as address:
        assert address == "tcp://cli:8786"  # --dask-address wins over engine.address; nothing started
    with shared_cluster(EngineParams(kind="dask", address="tcp://params:8786"), None) as address:
        assert address == "tcp://params:8786"
