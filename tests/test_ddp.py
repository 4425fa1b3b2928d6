"""DDP under torchrun: 2 gloo processes on the CPU train like one process, and only rank 0 writes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from pipeline.models.checkpoint import load_tensors
from pipeline.models.registry import create_model
from pipeline.training import RESUME_FILE
from tests.fixtures.toy import two_label_store

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
    print("RESULT " + json.dumps({"rank": distributed.rank(), "world": distributed.world_size(), **res}), flush=True)
    distributed.cleanup()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(work: Path, run: str, nproc: int | None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CXR_LOG_LEVEL": "WARNING"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    script = work / "train_script.py"
    cmd = [sys.executable, str(script), str(work), run]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(work), run]
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
