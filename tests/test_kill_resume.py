"""A run killed mid-training leaves nothing half-written; the next `dvc repro` finishes the job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pipeline.models.checkpoint import load_model
from tests.conftest import tiny_params
from tests.helpers import make_project


def test_sigkill_during_training_then_repro_finishes(tmp_path):
    params = tiny_params()
    params["train"]["epochs"] = 4
    project = make_project(tmp_path / "p", params)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "segment"], cwd=project, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train_baseline"], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = project / "models" / ".resume" / "c0" / "state.safetensors"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "training never saved its first epoch"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models" / "c0" / "model.safetensors").exists()
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "train_baseline"], cwd=project,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    model, meta = load_model(project / "models" / "c0")
    assert meta["cycle"] == 0 and len(meta["thresholds"]) == 4
    assert not state.exists()  # cleaned after a completed run
    assert not list(project.rglob("*.tmp"))
