"""DDP under torchrun: 2 gloo processes on the CPU train like one process, and only rank 0 writes;
`train.nproc_per_node: 2` makes `dvc repro` launch that torchrun itself, and a killed launch leaves no
rank behind. Dask workers can each own one GPU (CUDA_VISIBLE_DEVICES per worker)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from pipeline import distributed
from pipeline.config import ConfigError, EngineParams, load_params
from pipeline.models.checkpoint import load_model, load_tensors
from pipeline.models.registry import create_model
from pipeline.training import RESUME_FILE
from tests.conftest import tiny_params
from tests.fixtures.toy import two_label_store
from tests.helpers import free_port, make_project

ROOT = Path(__file__).resolve().parents[1]

# one training run; every rank prints its result, rank 0 alone saves the weights
SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from pipeline import distributed
    from pipeline.config import AugmentParams
    from pipeline.data.store import ArrayStore
    from pipeline.models.checkpoint import save_tensors
    from pipeline.models.registry import create_model
    from pipeline.training import Rows, TrainSpec, train_classifier

    work = Path(sys.argv[1])
    distributed.setup()
    torch.set_num_threads(1)
    store = ArrayStore(work / "imgs")
    y = np.load(work / "y.npy")
    idx = np.arange(len(store))
    torch.manual_seed(0)
    model = create_model("tinyvgg", 2)
    spec = TrainSpec(epochs=5, lr=3e-3, weight_decay=0.0, batch_size=16, seed=0, augment=AugmentParams())
    res = train_classifier(model, spec, ["a", "b"], Rows(store, idx[:112], y[:112]), Rows(store, idx[112:], y[112:]),
                           work / sys.argv[2])
    if distributed.is_main():
        save_tensors(work / sys.argv[2] / "model.safetensors", model.state_dict(), {})
    # one write of the whole line: both ranks share the pipe, and an unbuffered print (PYTHONUNBUFFERED,
    # as make sets it) writes the text and its newline separately, so two results could share a line
    sys.stdout.buffer.write(("RESULT " + json.dumps({"rank": distributed.rank(), "world": distributed.world_size(),
                                                     **res}) + "\\n").encode())
    sys.stdout.flush()
    distributed.cleanup()
''')


def _launch(work: Path, run: str, nproc: int | None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CXR_LOG_LEVEL": "WARNING"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    script = work / "train_script.py"
    cmd = [sys.executable, str(script), str(work), run]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(work), run]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(results, key=lambda r: r["rank"])


def test_two_gloo_ranks_match_one_process(tmp_path):
    _, y = two_label_store(tmp_path / "imgs", 160, top=45, left=30, shard_size=64)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "train_script.py").write_text(SCRIPT)
    single, = _launch(tmp_path, "single", None)
    ranks = _launch(tmp_path, "ddp", 2)

    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    # every rank validated the same weights: same history, best epoch and thresholds
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"] and ranks[0]["thresholds"] == ranks[1]["thresholds"]
    assert len(ranks[0]["history"]) == 5
    # same effective batch, steps and schedule: the same model within run-to-run noise
    assert abs(ranks[0]["best_score"] - single["best_score"]) < 0.05, (ranks[0]["best_score"], single["best_score"])
    last, last1 = ranks[0]["history"][-1], single["history"][-1]
    assert abs(last["val_loss"] - last1["val_loss"]) < 0.1 and abs(last["train_loss"] - last1["train_loss"]) < 0.1

    # rank 0 alone wrote: one resume file, one weights file, no temporaries
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["model.safetensors", RESUME_FILE]
    tensors, _ = load_tensors(tmp_path / "ddp" / "model.safetensors")
    assert not any(k.startswith("module.") for k in tensors)
    create_model("tinyvgg", 2).load_state_dict(tensors, strict=True)  # a plain model takes the weights
    state, _ = load_tensors(tmp_path / "ddp" / RESUME_FILE)
    assert "rng.torch.1" in state and not any(k.startswith("model.module.") for k in state)

    # a finished run's resume file is read by every rank: the rerun trains nothing and agrees
    again = _launch(tmp_path, "ddp", 2)
    for before, after in zip(ranks, again):
        assert after["history"] == before["history"] and after["thresholds"] == before["thresholds"]
    torch.testing.assert_close(load_tensors(tmp_path / "ddp" / "model.safetensors")[0], tensors, rtol=0, atol=0)


# ---------------------------------------------------------------- train.nproc_per_node: the stage launches torchrun

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMP_NUM_THREADS", "DVC_STAGE")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return {**env, "DVC_NO_ANALYTICS": "1", **extra}


@pytest.fixture(scope="module")
def ddp_project(tmp_path_factory) -> Path:
    """A tiny project with `train.nproc_per_node: 2` and its training inputs (prepared films, the audit's
    `enabled: false` note) made once by the stages themselves; the tests run `dvc repro -s train_baseline`,
    so dvc runs the stage as `dvc repro` does without rebuilding (and segmenting) upstream."""
    params = tiny_params()
    params["phantom"]["n_patients"] = 40
    params["audit"]["enabled"] = False
    params["cycles"] = {}
    params["train"].update(nproc_per_node=2, num_workers=0)  # no loader processes on top of 2 ranks on 2 cores
    params["compute"].update(device="cpu", threads=0)  # 0: both cores, one per rank
    project = make_project(tmp_path_factory.mktemp("ddp") / "p", params)
    for stage in ("prepare", "audit"):
        done = subprocess.run([sys.executable, "-m", f"pipeline.stages.{stage}"], cwd=project, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return project


def _copy(project: Path, dest: Path) -> Path:
    shutil.copytree(project, dest, symlinks=True)
    return dest


def _hand_launched(project: Path) -> subprocess.CompletedProcess:
    """The train stage under a torchrun started by hand, as the README's recipe does it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pipeline.stages.train", "--cycle", "0"], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=600)


def test_dvc_repro_trains_on_nproc_per_node_ranks_like_torchrun_by_hand(ddp_project, tmp_path):
    project = _copy(ddp_project, tmp_path / "p")
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "train_baseline"], cwd=project,
                          env=_env(CXR_LOG_LEVEL="INFO"), capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "launching 2 ranks (gloo on the CPU)" in out
    # both ranks joined one gloo group, each on one of the 2 cores (compute.threads 0 split in two)
    assert out.count("process group up: 2 ranks, backend gloo, 1 thread(s) per rank") == 2, out[-3000:]
    model_dir = project / "models" / "c0"
    dvc_tensors, dvc_meta = load_tensors(model_dir / "model.safetensors")
    _, meta = load_model(model_dir)
    assert meta["world_size"] == 2 and meta["cycle"] == 0
    assert not (project / "models" / ".resume" / "c0" / RESUME_FILE).exists()  # rank 0 cleaned up
    history = (project / "reports" / "train" / "c0" / "history.csv").read_bytes()

    shutil.rmtree(model_dir)
    by_hand = _hand_launched(project)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    hand_tensors, hand_meta = load_tensors(model_dir / "model.safetensors")
    # the same ranks, data, seeds and thread counts: the same bytes, not merely close ones
    torch.testing.assert_close(dvc_tensors, hand_tensors, rtol=0, atol=0)
    assert dvc_meta == hand_meta
    assert (project / "reports" / "train" / "c0" / "history.csv").read_bytes() == history


@pytest.mark.slow
def test_sigterm_mid_training_stops_every_rank_and_repro_resumes(ddp_project, tmp_path):
    """SIGTERM to the launching stage mid-training stops torchrun and both ranks; the next `dvc repro`
    continues from rank 0's resume file and ends with the weights of an uninterrupted run."""
    project = _copy(ddp_project, tmp_path / "p")
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"]["epochs"] = 16  # long enough that the signal lands mid-training
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "train_baseline"], cwd=project,
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = project / "models" / ".resume" / "c0" / RESUME_FILE
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and dvc.poll() is None:
        time.sleep(0.1)
    assert state.exists(), "training never wrote a resume point"
    family = psutil.Process(dvc.pid).children(recursive=True)
    stage = [p.cmdline() for p in family]
    stage = [(p, cmd) for p, cmd in zip(family, stage) if "pipeline.stages.train" in cmd and "-c" not in cmd]
    launcher = [p for p, cmd in stage if "--params" not in cmd]  # the ranks' command names its params
    assert len(launcher) == 1 and len(stage) == 3, stage  # the launcher and 2 ranks (and torchrun)
    launcher[0].send_signal(signal.SIGTERM)
    assert dvc.wait(timeout=120) != 0
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert state.exists() and not (project / "models" / "c0" / "model.safetensors").exists()

    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "train_baseline"], cwd=project,
                          env=_env(CXR_LOG_LEVEL="INFO"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    resumed, meta = load_tensors(project / "models" / "c0" / "model.safetensors")
    shutil.rmtree(project / "models" / "c0")
    assert _hand_launched(project).returncode == 0
    uninterrupted, meta_u = load_tensors(project / "models" / "c0" / "model.safetensors")
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)
    assert meta == meta_u


def test_nproc_per_node_on_missing_gpus_is_a_clear_error(tmp_path, monkeypatch):
    params = tiny_params()
    params["train"]["nproc_per_node"] = 2
    params["compute"]["device"] = "cuda"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    if not torch.cuda.is_available():  # here: params refuse cuda before any stage starts
        with pytest.raises(ConfigError, match="no CUDA device"):
            load_params(path)
    # one GPU for two ranks: refused before torchrun starts (faked: this machine has none)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("torchrun started"))
    with pytest.raises(ValueError, match=r"nproc_per_node=2 .* needs 2 CUDA devices, one per rank; torch sees 1"):
        distributed.launch("pipeline.stages.train", 2, [], "cuda", 0)
    with pytest.raises(ValueError, match="needs 2 CUDA devices"):
        distributed.launch("pipeline.stages.train", 2, [], "auto", 0)
    distributed.check_gpus("cpu", 2)  # gloo on the CPU needs no GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_gpus("cuda", 2)


def test_rank_threads_split_the_cores_and_device_follows_the_spec(monkeypatch):
    monkeypatch.setattr("pipeline.compute.available_cores", lambda: 2)
    assert distributed.rank_threads(0, 2) == 1 and distributed.rank_threads(0, 4) == 1  # at least one
    assert distributed.rank_threads(8, 2) == 4 and distributed.rank_threads(0, 1) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.rank_threads(6) == 3
    # single process: the spec resolved; no spec is the CPU, as before
    assert distributed.device() == torch.device("cpu") == distributed.device("cpu")
    from pipeline.compute import resolve_device

    assert distributed.device("auto") == resolve_device("auto")
    assert not distributed.uses_cuda("cpu") and distributed.uses_cuda("cuda:1")


# a rank that joins its group and then waits to be stopped
SLEEPER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from pipeline import distributed
    distributed.setup("cpu", 0)
    Path(sys.argv[1], f"rank{distributed.rank()}.pid").write_text(str(os.getpid()))
    time.sleep(300)
''')
LAUNCHER = textwrap.dedent('''
    import logging, sys
    from pipeline import distributed
    logging.basicConfig(level="INFO")
    sys.exit(distributed.launch("ddp_sleeper", 2, [sys.argv[1]], "cpu", 0))
''')


@pytest.mark.parametrize("kill", ["sigterm-launcher", pytest.param("sigkill-launcher", marks=pytest.mark.slow),
                                  pytest.param("sigkill-group", marks=pytest.mark.slow)])
def test_a_killed_launch_leaves_no_rank_behind(tmp_path, kill):
    """SIGTERM to the stage is forwarded to torchrun, which stops its ranks. A SIGKILL of the stage
    alone reaches torchrun as its parent-death signal (SIGTERM); a SIGKILL of the whole process group
    (a killed `dvc repro`) kills torchrun too but misses the ranks, which torchrun starts in sessions of
    their own: they die with torchrun by their own parent-death signal."""
    (tmp_path / "ddp_sleeper.py").write_text(SLEEPER)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    env = _env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", CXR_LOG_LEVEL="INFO")
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    ranks = [psutil.Process(int(p.read_text())) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(ranks) == 2, launcher.communicate()[0][-3000:]
    family = psutil.Process(launcher.pid).children(recursive=True)  # torchrun, the ranks
    assert {r.pid for r in ranks} <= {p.pid for p in family}
    if kill == "sigterm-launcher":
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=60)
        assert launcher.returncode != 0 and "stopping the ranks" in out, out[-3000:]
    elif kill == "sigkill-launcher":
        launcher.kill()
        launcher.wait(timeout=30)
    else:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


# ---------------------------------------------------------------- Dask: one GPU per worker


def _visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_local_cluster_gives_each_worker_its_own_gpu(monkeypatch):
    """With 2 GPUs visible (faked here: the per-worker variable is what is under test), the
    LocalCluster starts one worker per GPU, each seeing only its own."""
    from distributed import Client

    from pipeline.engine import Engine, local_cluster

    real = distributed.visible_gpus
    monkeypatch.setattr(distributed, "visible_gpus", lambda spec="auto": ["0", "1"])
    with local_cluster(EngineParams(kind="dask")) as cluster, Client(cluster, set_as_default=False) as client:
        seen = client.run(_visible_devices)
        assert sorted(seen.values()) == ["0", "1"]
        engine = Engine(EngineParams(kind="dask"), client)
        assert engine.workers == 2
        assert set(engine.map(_visible_devices, [()] * 8)) <= {"0", "1"}
    assert real("cpu") == [] and real("cuda:1") == []  # the CPU, or one chosen GPU that every worker sees
