"""Crash consistency: SIGKILL training, every DVC stage and the Prefect flow at seeded random points.

After every kill: no partial store, shard or checkpoint is visible (a store without index.json is
refused by readers; every visible shard, checkpoint, resume state and JSON file loads whole), then
`dvc repro` completes and every output's md5 equals an uninterrupted run's, and training resumed
from its last saved epoch ends with the same weights, bit for bit on the CPU.

The short variant (3 kills: the flow, a shard-writing stage, training) runs in `make test` against
the session's uninterrupted tiny project; the long one (`slow`, 20 kills over every stage, plain
training and the flow) times its own uninterrupted run to place the kills.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.models.checkpoint import load_tensors
from tests.conftest import tiny_params
from tests.helpers import make_project
from tests.pipeline_runs import (ENV, Leftovers, assert_same_code, check_invariants, dvc_ok, flow_env, launch,
                                 lock, lock_outs, out_mismatches, project_like, reference_project,
                                 new_shards, running_command, sigkill, subreaper, wait_for)
from tests.reliability import record

SEED = 7
PY = sys.executable
RESUMED = "resuming from epoch"  # pipeline.training logs this when it continues a killed run


@pytest.fixture(autouse=True)
def _reap_orphans():
    with subreaper():
        yield


@dataclass(frozen=True)
class Kill:
    stage: str   # the DVC stage interrupted
    via: str     # "dvc": dvc repro; "flow": python -m flows.refine; "direct": the stage's own command
    at: str      # "random": a seeded point of the stage's run; "shard": its first shard appears;
                 # "resume": training saved an epoch's resume state


class Crasher:
    """Runs kills against one project and checks the invariants after each."""

    def __init__(self, project: Path, reference: Path, rng: random.Random, prefect_home: Path,
                 durations: dict[str, float] | None = None):
        self.project, self.reference, self.rng = project, reference, rng
        self.prefect_home = prefect_home
        self.cmds = {stage: entry["cmd"] for stage, entry in lock(reference).items()}
        self.durations = durations or {}
        self.by_target: Counter = Counter()  # what was killed: a stage under dvc, the flow, plain training
        self.by_stage: Counter = Counter()   # which stage was running when it was
        self.figures = Counter()
        self.temps_seen: set[str] = set()
        self.resumed_runs = 0

    def _argv(self, kill: Kill, forced: bool) -> tuple[list[str], dict]:
        if kill.via == "flow":
            return [PY, "-m", "flows.refine", "--root", "."], flow_env(self.prefect_home)
        if kill.via == "direct":
            return [PY, *self.cmds[kill.stage].split()[1:]], ENV
        return [PY, "-m", "dvc", "repro", *(["--force", "--single-item"] if forced else []), kill.stage], ENV

    def _resume_file(self, stage: str) -> Path:
        # a training stage's state lives under its cycle: train_baseline -> c0, train@cK -> cK (the
        # per-cycle commands carry no --cycle; dvc.yaml's header says why)
        m = re.search(r"pipeline\.stages\.(\w+)", self.cmds[stage])
        name = (stage.partition("@")[2] or "c0") if m.group(1) == "train" else m.group(1)
        return self.project / "models" / ".resume" / name / "state.safetensors"

    def _store_outs(self, stage: str) -> list[str]:
        return [o for o in lock_outs(self.reference)[stage] if any((self.reference / o).rglob("index.json"))]

    def interrupt(self, kill: Kill) -> Leftovers:
        """Start the run, SIGKILL it at the kill's point (again, earlier, if the run ended first)."""
        forced = kill.stage in lock(self.project)  # already done: rerun it to have something to kill
        for attempt in range(4):
            argv, env = self._argv(kill, forced)
            started = time.time()
            proc = launch(self.project, argv, env)
            try:
                if kill.at == "shard":
                    outs = self._store_outs(kill.stage)
                    wait_for(proc, lambda: new_shards(self.project, outs, started), 600, f"shard of {kill.stage}")
                    delay = 0.0  # at once: the store's later shards and its index are not written yet
                elif kill.at == "resume":
                    state = self._resume_file(kill.stage)
                    wait_for(proc, lambda: state.is_file() and state.stat().st_mtime >= started, 600,
                             f"resume state of {kill.stage}")
                    delay = 0.0  # at once: the next resume point is a few steps away
                else:
                    wait_for(proc, lambda: running_command(proc, self.cmds[kill.stage]), 600,
                             f"{kill.stage} running")
                    delay = self.rng.uniform(0, self.durations.get(kill.stage, 3.0)) / 2 ** attempt
                time.sleep(delay)
            finally:
                landed = sigkill(proc)
            print(f"{time.strftime('%X')} {kill} attempt {attempt}: killed after {time.time() - started:.1f} s"
                  f" ({delay:.2f} s past its point){'' if landed else ', but the run had ended'}", flush=True)
            if landed:
                break
            forced = kill.via == "dvc"  # the run finished before the kill: once more, killed earlier
            assert kill.via == "dvc", f"{kill} finished before the kill"
        assert landed, f"{kill}: every run finished before its kill"
        self.by_target[{"flow": "flow", "direct": "train (direct)"}.get(kill.via, kill.stage)] += 1
        self.by_stage[kill.stage] += 1
        left = check_invariants(self.project)
        assert not left.violations, f"after {kill}:\n" + "\n".join(left.violations)
        if kill.at == "resume" and self._resume_file(kill.stage).is_file():
            meta = load_tensors(self._resume_file(kill.stage))[1]
            self.figures["mid_epoch_resume_points"] += meta["step"] > 0
        self.temps_seen.update(left.temps)
        self.figures.update(checkpoint_loads=left.checkpoints_loaded, resume_states_loaded=left.resume_states_loaded,
                            stores_complete=left.stores_complete, stores_uncommitted=left.stores_uncommitted,
                            shards_checked=left.shards_checked, files_parsed=left.files_parsed)
        return left

    def complete(self, stage: str, rerun: bool) -> bool:
        """`dvc repro` to the end of `stage`, recomputed: never restored from the run-cache, and for a
        stage that had completed before the kill (`rerun`) forced, as dvc would otherwise check the
        earlier result out of its cache instead of continuing the killed run. Then every output DVC has
        recorded so far must equal the uninterrupted run's."""
        resume = self._resume_file(stage)
        had_resume = resume.is_file()
        how = ["--force", "--single-item"] if rerun else ["--no-run-cache"]
        proc = subprocess.run([PY, "-m", "dvc", "repro", *how, stage], cwd=self.project,
                              env={**ENV, "CXR_LOG_LEVEL": "INFO"}, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, (f"dvc repro {stage} after a kill failed:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
        resumed = had_resume and RESUMED in proc.stdout + proc.stderr
        self.resumed_runs += resumed
        assert_same_code(self.project, self.reference)
        bad = out_mismatches(self.project, self.reference, [s for s in lock(self.project) if s in self.cmds])
        assert not bad, f"after a kill in {stage}, outputs differ from the uninterrupted run:\n" + "\n".join(bad)
        self.figures["repro_ok"] += 1
        return resumed

    def run(self, kill: Kill) -> Leftovers:
        rerun = kill.stage in lock(self.project)
        left = self.interrupt(kill)
        resumed = self.complete(kill.stage, rerun)
        if kill.at == "resume":  # killed between two epochs' resume states: the rerun must continue it
            assert resumed, f"{kill}: the run after the kill did not resume from the saved epoch"
        return left

    def finish(self) -> dict:
        """A plain `dvc repro` after everything: nothing left to run, every hash the reference's."""
        out = dvc_ok(self.project, "repro")
        assert "Running stage" not in out, out
        bad = out_mismatches(self.project, self.reference)
        assert not bad, "\n".join(bad)
        weights = sorted(p.relative_to(self.reference) for p in (self.reference / "models").glob("*/*.safetensors")
                         if not p.parent.name.startswith("."))  # checkpoints, not resume states
        assert weights
        for rel in weights:
            assert (self.project / rel).read_bytes() == (self.reference / rel).read_bytes(), rel
        return {"hash_mismatches": len(bad), "outputs_compared": sum(map(len, lock_outs(self.reference).values())),
                "weights_compared": [str(w) for w in weights], "resumed_weights_equal": True,
                "temps_left_after_repro": check_invariants(self.project).temps}


def test_sigkill_flow_shard_writer_and_training(tmp_path):
    """Short variant: the flow, prepare after its first shard, training after its first epoch."""
    t0 = time.time()
    reference = reference_project()
    t_ref = time.time() - t0
    project = project_like(reference, tmp_path / "p")
    crash = Crasher(project, reference, random.Random(SEED), tmp_path / "prefect")
    crash.run(Kill("prepare", "flow", "random"))
    left = crash.run(Kill("prepare", "dvc", "shard"))
    assert left.stores_uncommitted, "the kill came after prepare had committed its stores"
    crash.run(Kill("train_baseline", "dvc", "resume"))
    # tiny_params write a resume point every 2 steps: the kill came mid-epoch, and the resumed run's
    # checkpoint below is still the uninterrupted one's, byte for byte
    assert crash.figures["mid_epoch_resume_points"] == 1, crash.figures
    bad = out_mismatches(project, reference, ["prepare", "train_baseline"])
    assert not bad, bad
    for rel in ("models/c0/model.safetensors", "models/c0/model.json"):
        assert (project / rel).read_bytes() == (reference / rel).read_bytes(), rel
    record("crash_consistency.short", kills=3, by_target=dict(crash.by_target), by_stage=dict(crash.by_stage),
           partial_shards_visible=0,
           hash_mismatches=0, resumed_runs=crash.resumed_runs, resumed_weights_equal=True,
           temps_left_by_kills=len(crash.temps_seen), seconds=round(time.time() - t0 - t_ref, 1),
           **crash.figures)


# ---------------------------------------------------------------- long variant


def long_params() -> dict:
    """The tiny project with one refinement cycle, trained for more epochs so kills land mid-training."""
    p = tiny_params()
    p["train"].update(epochs=4, finetune_epochs=2)
    p["cycles"] = {"c1": {"id": 1, "prev": 0}}
    return p


def timed_repro(project: Path) -> dict[str, float]:
    """`dvc repro`, returning each stage's wall time (from its start to the next stage's)."""
    t0 = time.time()
    proc = subprocess.Popen([PY, "-m", "dvc", "repro"], cwd=project, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    starts, tail = [], []
    for line in proc.stdout:
        m = re.match(r"Running stage '([^']+)'", line)
        if m:
            starts.append((m.group(1), time.time()))
        tail = (tail + [line])[-60:]
    assert proc.wait() == 0, "".join(tail)
    ends = [t for _, t in starts[1:]] + [time.time()]
    return {stage: end - start for (stage, start), end in zip(starts, ends)} | {"_total": time.time() - t0}


def flow_order(stages) -> list[str]:
    """The order flows/refine.py runs stages in (a topological order of dvc.yaml), then any others."""
    cycles = sorted({int(s.split("@c")[1]) for s in stages if "@c" in s})
    order = ["prepare", "segment", "audit", "train_baseline", "evaluate_baseline",
             *[f"{s}@c{k}" for k in cycles for s in ("cam", "enhance", "train", "evaluate")],
             "sanity_twin", "sanity", "review_scores", "report"]
    return [s for s in order if s in stages] + [s for s in stages if s not in order]


def kill_plan(stages: list[str], cmds: dict[str, str], store_stages: set[str], rng: random.Random,
              total: int = 20) -> list[Kill]:
    """At least one kill per stage (the first one, on the pending stage, sometimes through the flow),
    one after a shard appears for every store-writing stage, one after a saved epoch for every training
    stage, plain training once; seeded extra random kills up to `total`."""
    flow_at = set(rng.sample([s for s in stages if s != "train_baseline"], 4))  # that one starts with plain training
    plan: list[Kill] = []
    for stage in stages:
        # the stages that train write resume points: cycle 0, the fine-tunes and the permuted-label twin
        is_train = any(f"pipeline.stages.{name} " in cmds[stage] + " " for name in ("train", "sanity_twin"))
        if stage == "train_baseline":
            plan.append(Kill(stage, "direct", "resume"))
        plan.append(Kill(stage, "flow" if stage in flow_at else "dvc", "random"))
        if stage in store_stages:
            plan.append(Kill(stage, "dvc", "shard"))
        if is_train:
            plan.append(Kill(stage, "dvc", "resume"))
    # direct and flow kills must meet a pending stage: they come first for their stage
    while len(plan) < total:
        stage = rng.choice(stages)
        last = max(i for i, k in enumerate(plan) if k.stage == stage)
        plan.insert(last + 1, Kill(stage, "dvc", "random"))
    return plan


@pytest.fixture(scope="module")
def timed_reference(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("crash_ref") / "p", long_params())
    durations = timed_repro(project)
    return project, durations


@pytest.mark.slow
def test_twenty_sigkills_across_training_every_stage_and_the_flow(timed_reference, tmp_path):
    reference, durations = timed_reference
    t0 = time.time()
    rng = random.Random(SEED)
    cmds = {stage: entry["cmd"] for stage, entry in lock(reference).items()}
    stages = flow_order(list(cmds))
    project = make_project(tmp_path / "p", yaml.safe_load((reference / "params.yaml").read_text()))
    crash = Crasher(project, reference, rng, tmp_path / "prefect", durations)
    store_stages = {s for s in stages if crash._store_outs(s)}
    plan = kill_plan(stages, cmds, store_stages, rng)
    assert len(plan) >= 20 and {k.stage for k in plan} == set(stages)
    for kill in plan:
        crash.run(kill)
    final = crash.finish()
    record("crash_consistency", kills=len(plan), by_target=dict(crash.by_target), by_stage=dict(crash.by_stage),
           by_point=dict(Counter(k.at for k in plan)), partial_shards_visible=0, resumed_runs=crash.resumed_runs,
           temps_left_by_kills=len(crash.temps_seen), seconds=round(time.time() - t0, 1),
           reference_seconds=round(durations["_total"], 1), **final, **crash.figures)
