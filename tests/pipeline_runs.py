"""Shared by the crash-consistency and determinism tests: run the tiny pipeline, read what DVC
recorded (dvc.lock), SIGKILL a run at a chosen point, and check what a killed run left behind.

Written against stage behaviour and output hashes, not a stage's internals: a store is "complete"
when its index.json names shards that all load with the index's shape; a checkpoint is whatever
`load_model` / `load_tensors` accept.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest
import yaml

from tests.helpers import GIT_IDENTITY, make_project

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "CXR_LOG_LEVEL": "WARNING",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
STORE_FORMAT = "cxr-array-store/1"
CODE_DIRS = ("pipeline", "flows")


def dvc(project: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def dvc_ok(project: Path, *args: str) -> str:
    proc = dvc(project, *args)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def reference_project() -> Path:
    """An uninterrupted `dvc repro` of the tiny project (cycle 0 + one refinement cycle), built once per
    test session: the same project the viewer and remote tests use, so a whole `make test` pays once."""
    from tests.viewer_support import trained_project

    return trained_project()


@dataclass
class FlowRun:
    """`python -m flows.refine` on a clean checkout of the reference project (tests/test_determinism.py
    checks its outputs, tests/test_flow_watch.py what a user watching it sees)."""
    checkout: Path
    run_id: str
    stdout: str
    stderr: str
    seconds: float


def run_git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env={**ENV, **GIT_IDENTITY}, check=True, capture_output=True,
                          text=True).stdout


_flow_runs: dict[str, FlowRun] = {}


def clean_checkout_flow_run() -> FlowRun:
    """The reference project's git commit (code, params, dvc.yaml) plus its dvc.lock, with no output and
    no DVC cache, run the way `make run` runs it: the Prefect flow in its own process, shard tasks on a
    Dask LocalCluster, and OMP_NUM_THREADS=1 in its environment as a Dask cluster leaves it. Once per
    session: it costs a whole tiny run (250-350 s here).

    The run reports to the session's Prefect test server (the `prefect_harness` fixture must be active),
    so its logs and artifacts can be read back through the API; where a run reports changes no output."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    assert api, "clean_checkout_flow_run needs the prefect_harness fixture"
    if api not in _flow_runs:
        reference = reference_project()
        tmp = Path(tempfile.mkdtemp(prefix="cxr-flow-run-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        checkout = tmp / "checkout"
        run_git(tmp, "clone", "-q", str(reference), str(checkout))
        shutil.copy(reference / "dvc.lock", checkout / "dvc.lock")
        run_git(checkout, "add", "dvc.lock")
        run_git(checkout, "commit", "-qm", "the reference run's lock")
        assert not (checkout / "models" / "c0").exists() and not any((checkout / ".dvc" / "cache").rglob("*.dir"))
        env = {**ENV, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "CXR_ENGINE": "dask", "CXR_LOG_LEVEL": "INFO"}
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "flows.refine", "--root", "."], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run_id = _flow_run_id(t0 - 1)
        _flow_runs[api] = FlowRun(checkout, run_id, proc.stdout, proc.stderr, round(time.time() - t0, 1))
    return _flow_runs[api]


def _flow_run_id(since: float) -> str:
    """The one flow run that completed on the session's server since `since` (this worker runs one
    test at a time, so it is the run just made)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:  # a sort given: prefect 3.8.8's default (null) gets a 422
        runs = [r for r in client.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
                if r.created is not None and r.created.timestamp() >= since and r.state and r.state.is_completed()]
    assert len(runs) == 1, f"{len(runs)} flow runs reached the Prefect server since the clean-checkout run began"
    return str(runs[0].id)


def project_like(reference: Path, dest: Path) -> Path:
    """A fresh git + DVC project with this checkout's code and `reference`'s params."""
    return make_project(dest, yaml.safe_load((reference / "params.yaml").read_text()))


# ---------------------------------------------------------------- dvc.lock


def lock(project: Path) -> dict:
    path = project / "dvc.lock"
    return yaml.safe_load(path.read_text())["stages"] if path.is_file() else {}


def lock_outs(project: Path) -> dict[str, dict[str, str]]:
    """{stage: {output path: md5}} for every output DVC recorded (cached outs, metrics and plots alike)."""
    return {stage: {o["path"]: o["md5"] for o in entry.get("outs", [])} for stage, entry in lock(project).items()}


def code_deps(project: Path) -> dict[str, str]:
    """md5 of every code dependency DVC recorded: two runs compare only if they ran the same code."""
    return {d["path"]: d["md5"] for entry in lock(project).values() for d in entry.get("deps", [])
            if d["path"].split("/")[0] in CODE_DIRS}


def assert_same_code(project: Path, reference: Path) -> None:
    ours, theirs = code_deps(project), code_deps(reference)
    differ = sorted(p for p in ours.keys() & theirs.keys() if ours[p] != theirs[p])
    assert not differ, f"the code changed between the reference run and this one ({differ}): rerun both"


def out_mismatches(project: Path, reference: Path, stages=None) -> list[str]:
    """Outputs whose md5 differs from the reference run's (or that the project's lock lacks)."""
    ours, ref = lock_outs(project), lock_outs(reference)
    bad = []
    for stage in (ref if stages is None else stages):
        for path, md5 in ref[stage].items():
            if ours.get(stage, {}).get(path) != md5:
                bad.append(f"{stage}: {path} {ours.get(stage, {}).get(path)} != {md5}")
    return bad


# ---------------------------------------------------------------- what a killed run may leave


@dataclass
class Leftovers:
    """What `check_invariants` looked at after a kill; `violations` must stay empty."""
    stores_complete: int = 0
    stores_uncommitted: int = 0     # shards without index.json: refused by readers, redone by the stage
    shards_checked: int = 0
    checkpoints_loaded: int = 0
    resume_states_loaded: int = 0
    files_parsed: int = 0
    temps: list[str] = field(default_factory=list)  # hidden `.name.XXXX.tmp` files of killed writers
    violations: list[str] = field(default_factory=list)


def _check_store(root: Path, out: Leftovers) -> None:
    from pipeline.data.store import ArrayStore, StoreError

    shards = sorted(p.name for p in root.glob("shard-*.npy"))
    arrays = {}
    for name in shards:  # every visible shard is whole, index or not
        try:
            arrays[name] = np.load(root / name, allow_pickle=False)
            out.shards_checked += 1
        except Exception as err:  # noqa: BLE001 - any failure to load is the violation being looked for
            out.violations.append(f"partial shard visible: {root / name}: {err!r}")
    index = root / "index.json"
    if not index.is_file():
        out.stores_uncommitted += 1
        try:
            ArrayStore(root)
            out.violations.append(f"{root}: a reader accepted a store without index.json")
        except StoreError:
            pass
        return
    try:
        meta = json.loads(index.read_text())
    except ValueError as err:
        out.violations.append(f"{index}: unreadable index: {err}")
        return
    if meta.get("format") != STORE_FORMAT:
        return  # not one of ours
    listed = [s["file"] for s in meta["shards"]]
    if sorted(listed) != shards:
        out.violations.append(f"{root}: index lists {listed}, directory holds {shards}")
    item_shape, dtype = tuple(meta["item_shape"]), np.dtype(meta["dtype"])
    for s in meta["shards"]:
        arr = arrays.get(s["file"])
        if arr is not None and (arr.shape != (s["count"], *item_shape) or arr.dtype != dtype):
            out.violations.append(f"{root / s['file']}: {arr.shape} {arr.dtype}, index says "
                                  f"{(s['count'], *item_shape)} {dtype}")
    if sum(s["count"] for s in meta["shards"]) != meta["count"]:
        out.violations.append(f"{root}: shard counts do not add up to {meta['count']}")
    try:
        store = ArrayStore(root)
        if len(store):
            store[len(store) - 1]
        out.stores_complete += 1
    except Exception as err:  # noqa: BLE001
        out.violations.append(f"{root}: complete store does not read: {err!r}")


def check_invariants(project: Path) -> Leftovers:
    """After a SIGKILL: no partial store, shard, checkpoint or file is visible under a real name."""
    from pipeline.models.checkpoint import MODEL_FILE, load_model, load_tensors

    out = Leftovers()
    files = [p for p in project.rglob("*")  # the project's outputs, not its code or git/dvc metadata
             if p.is_file() and p.relative_to(project).parts[0] not in (".git", ".dvc", *CODE_DIRS)]
    out.temps = sorted(str(p.relative_to(project)) for p in files if p.name.startswith(".") and p.name.endswith(".tmp"))
    stores = {p.parent for p in files if p.name == "index.json" or (p.name.startswith("shard-") and p.suffix == ".npy")}
    for root in sorted(stores):
        _check_store(root, out)
    for f in files:
        rel = f.relative_to(project)
        if f.name.startswith(".") or f.parent in stores:
            continue
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".npz":
                with np.load(f, allow_pickle=False) as z:
                    [z[k] for k in z.files]
            elif f.suffix == ".parquet":
                import pandas as pd
                pd.read_parquet(f)
            elif f.suffix == ".safetensors":
                if f.name == MODEL_FILE and f.parent.parent.name == "models" and f.parent.name.startswith("c"):
                    _, meta = load_model(f.parent)
                    assert meta["cycle"] == int(f.parent.name[1:]), meta["cycle"]
                    out.checkpoints_loaded += 1
                else:
                    load_tensors(f)
                    if ".resume" in rel.parts:
                        out.resume_states_loaded += 1
                    else:
                        out.checkpoints_loaded += 1
            else:
                continue
            out.files_parsed += 1
        except Exception as err:  # noqa: BLE001
            out.violations.append(f"partial or corrupt file visible: {rel}: {err!r}")
    latest = project / "models" / "latest.json"
    if latest.is_file():
        try:
            target = project / json.loads(latest.read_text())["checkpoint"]
            load_model(target.parent if target.name == MODEL_FILE else target)
        except Exception as err:  # noqa: BLE001
            out.violations.append(f"models/latest.json names a checkpoint that does not load: {err!r}")
    return out


# ---------------------------------------------------------------- launching and killing


def launch(project: Path, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a command in its own session (so one killpg reaches everything it started); its output
    goes to a log beside the project (`proc.log`)."""
    logs = project.parent / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"{len(list(logs.iterdir())):03d}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=project, env=env or ENV, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = log
    return proc


def flow_env(prefect_home: Path) -> dict:
    """An ephemeral Prefect (no server to reach) with its own home, as `make run` uses it."""
    env = {k: v for k, v in ENV.items() if k != "PREFECT_API_URL"}
    # the temporary server gets 20 s to start by default: not always enough on a busy 2-core machine
    return {**env, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}


def running_command(proc: subprocess.Popen, cmd: str) -> bool:
    """Whether a descendant of `proc` runs `cmd` (a stage's command as dvc.yaml spells it)."""
    want = cmd.split()[1:]  # "python -m pipeline.stages.x --cycle 1" minus the interpreter's name
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for kid in kids:
        try:
            argv = kid.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if argv[-len(want):] == want or (len(argv) >= 3 and argv[-2] == "-c" and argv[-1].split()[1:] == want):
            return True
    return False


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            tail = proc.log.read_text(errors="replace")[-3000:] if hasattr(proc, "log") else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{tail}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


PR_SET_CHILD_SUBREAPER = 36


@contextmanager
def subreaper():
    """Make this process the reaper of the orphans of the runs it kills (Linux).

    A killed run's grandchildren (the flow's `dvc repro`, a stage under dvc) are orphaned. Where PID 1
    does not reap orphans (a bare container), they stay zombies, and a zombie's PID still "exists": DVC
    then takes the killed `dvc repro`'s entry in .dvc/tmp/rwlock for a live process and refuses to run.
    An init that reaps (systemd, tini) would not show this; reaping them here makes the tests the same
    everywhere. `sigkill` reaps the orphans of the group it killed.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("cannot become a child subreaper (not Linux?)")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(pgid: int, pids: set[int], timeout: float = 60) -> None:
    """Wait for this process's children that belonged to the killed group (orphans handed to us)."""
    deadline = time.monotonic() + timeout
    while True:
        ours = []
        for child in psutil.Process().children():
            try:
                if child.pid in pids or os.getpgid(child.pid) == pgid:
                    ours.append(child.pid)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not ours:
            return
        for pid in ours:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        assert time.monotonic() < deadline, f"processes of the killed run outlived it: {ours}"


def sigkill(proc: subprocess.Popen) -> bool:
    """SIGKILL the run's process group and anything it started elsewhere; True if it was still running."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for kid in kids:  # e.g. a server or a cluster worker that moved to a session of its own
        try:
            kid.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    _reap(proc.pid, {k.pid for k in kids})
    return alive


def new_shards(project: Path, outs, since: float) -> list[Path]:
    """Shards under `outs` written after `since` (a time.time())."""
    found = []
    for o in outs:
        for f in (project / o).rglob("shard-*.npy"):
            try:
                if f.stat().st_mtime >= since:
                    found.append(f)
            except FileNotFoundError:  # removed meanwhile (dvc clearing the stage's outputs)
                continue
    return found
