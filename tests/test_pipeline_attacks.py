"""Attacks on the pipeline itself (not the viewer): each was found to work, and is shown not to any more.

- Resume across a changed configuration: a killed training run's state, written under one label list
  or one `train.weights` file, must not be continued after either changed (the resume fingerprint
  covers both); it still is when nothing changed.
- A corrupt resume file (truncated, random bytes, a valid safetensors file of the wrong content) is
  discarded with a warning and training starts fresh, instead of failing the stage on every rerun.
- Shell injection through params: dvc pastes interpolated params into a stage's `cmd` and runs it
  through a shell before anything validates them, so `cycles.c1.id='1; touch x'` ran `touch`. The
  per-cycle commands interpolate nothing now; the stage finds its cycle from dvc's $DVC_STAGE in the
  validated params.
- Dataset CSV paths: a `../` or absolute path in a CSV, or a symlink in the dataset, must not make
  prepare read a file outside `data.root`; such rows are quarantined with a reason.

Each test records its figures for reports/reliability.json (tests/reliability.py).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import pipeline.training as training
from pipeline.config import ConfigError, Params, Paths
from pipeline.data.labels import CANONICAL_LABELS
from pipeline.data.record import Quarantined, Record, materialise
from pipeline.data.sources.common import OUTSIDE_ROOT
from pipeline.models.checkpoint import load_tensors, save_tensors
from pipeline.models.registry import create_model
from pipeline.stages import train as train_stage
from pipeline.stages.common import stage_cycle
from pipeline.training import RESUME_FILE
from tests.conftest import ROOT, tiny_params
from tests.fixtures.images import radiograph, write_dicom, write_jpeg, write_png
from tests.fixtures.toy import train_toy, two_label_store
from tests.reliability import record

LABELS = ["Pneumonia", "Cardiomegaly"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread when another process shares the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Stands for SIGKILL: raised from the second epoch's validation, after the first epoch's state is saved."""


@contextmanager
def counted_predict(monkeypatch, kill_at: int | None = None):
    """Count training's validation passes (`calls["n"]`); raise Killed on pass `kill_at`."""
    real, calls = training.predict, {"n": 0}

    def predict(*a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(training, "predict", predict)
    try:
        yield calls
    finally:
        monkeypatch.setattr(training, "predict", real)


# =================================================================================================
# Resume across a changed configuration (the train stage's fingerprint)
# =================================================================================================

def _tiny_project(root: Path, n: int = 24) -> Paths:
    """A prepared project the train stage can run on: 32 px toy images, three labels, train/val split."""
    paths = Paths(root)
    store, y = two_label_store(paths.images, n)
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k}" for k in range(n)],
                          "split": ["train"] * 16 + ["val"] * (n - 16), "source_path": "toy", "view": "PA"})
    for label in CANONICAL_LABELS:
        frame[label] = np.nan
    frame["Pneumonia"], frame["Cardiomegaly"] = y[:, 0], y[:, 1]
    frame["Edema"] = 1.0 - y[:, 0]
    frame.to_parquet(paths.manifest, index=False)
    return paths


def _params(labels: list[str], weights: Path | None) -> Params:
    return Params.model_validate({
        "data": {"image_size": 32, "labels": labels},
        "train": {"arch": "tinyvgg", "epochs": 2, "batch_size": 8, "weights": str(weights) if weights else None,
                  "augment": {"rotate_deg": 0, "shift": 0, "scale": 0, "brightness_contrast": 0}}})


def _weights_file(path: Path, seed: int) -> Path:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in create_model("tinyvgg", len(LABELS)).state_dict().items()}
    save_file(state, str(path))
    return path


def _train(params: Params, paths: Paths) -> None:
    train_stage.run(params, paths, argparse.Namespace(cycle=0))


def test_a_resume_state_is_not_continued_after_labels_or_weights_changed(tmp_path, monkeypatch, caplog):
    paths = _tiny_project(tmp_path / "p")
    weights = _weights_file(tmp_path / "start.safetensors", seed=1)
    before = _params(LABELS, weights)
    state = paths.resume_dir(0) / RESUME_FILE
    with counted_predict(monkeypatch, kill_at=2), pytest.raises(Killed):
        _train(before, paths)  # killed in its second epoch: the first epoch's state is kept
    killed_state = state.read_bytes()

    def weights_replaced_in_place():
        _weights_file(weights, seed=2)  # the same path, other weights
        return before

    changes = {
        "labels reordered": lambda: _params(LABELS[::-1], weights),
        "a label swapped for another (same count)": lambda: _params(["Pneumonia", "Edema"], weights),
        "train.weights replaced in place": weights_replaced_in_place,
        "train.weights dropped": lambda: _params(LABELS, None),
        "nothing": lambda: before,
    }
    fresh, resumed = {}, {}
    for what, after in changes.items():
        _weights_file(weights, seed=1)
        state.write_bytes(killed_state)  # the killed run's state, as it left it
        caplog.clear()
        with counted_predict(monkeypatch) as calls, caplog.at_level(logging.INFO, logger="pipeline.training"):
            _train(after(), paths)
        log = caplog.text
        # a fresh run validates both epochs (+ calibrates); a resumed one only the second
        fresh[what] = calls["n"] == 3 and "different configuration" in log and "resuming" not in log
        resumed[what] = calls["n"] == 2 and "resuming from epoch 1" in log
        assert not state.exists(), what  # a completed run removes its resume state
    assert fresh == {what: what != "nothing" for what in changes}, fresh
    assert resumed == {what: what == "nothing" for what in changes}, resumed
    # refused: changed configurations whose state was not continued; violations: ones that were
    record("attacks.resume_changed_config", cases=len(changes) - 1, refused=len(changes) - 1, violations=0,
           resumed_unchanged=1)


# =================================================================================================
# A corrupt resume file
# =================================================================================================

def _classifier_run(store, y, resume_dir: Path) -> tuple[torch.nn.Module, dict]:
    return train_toy(store, y, resume_dir, epochs=2, batch_size=8, n_train=16)


def _bad_resume_files(good: bytes, tensors: dict, meta: dict) -> dict[str, bytes | tuple[dict, dict]]:
    """Raw bytes, or (tensors, metadata) for a valid safetensors file (its fingerprint this run's)."""
    first_model = next(k for k in tensors if k.startswith("model.") and tensors[k].ndim == 4)
    first_opt = next(k for k in tensors if k.startswith("opt.") and k.endswith("exp_avg"))
    other = {f"{p}.{k}": v.clone() for k, v in create_model("resnet18", 2).state_dict().items()
             for p in ("model", "best")}
    return {
        "truncated to half": good[: len(good) // 2],
        "truncated inside the header": good[:20],
        "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "a weight of the wrong shape": ({**tensors, first_model: torch.zeros(1, 1, 1, 1)}, meta),
        "another model's weights": ({**{k: v for k, v in tensors.items() if not k.startswith(("model.", "best."))},
                                     **other}, meta),
        "optimiser state of the wrong shape": ({**tensors, first_opt: torch.zeros(3)}, meta),
        "no generator state": ({k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta),
        "epoch not a number": (tensors, {**meta, "epoch": "1; touch x"}),
        "schedule settings garbled": (tensors, {**meta, "sched": {"T_max": "a"}}),
    }


def test_a_corrupt_resume_file_is_discarded_and_training_starts_fresh(tmp_path, monkeypatch, caplog):
    store, y = two_label_store(tmp_path / "imgs", 24)
    reference, ref_res = _classifier_run(store, y, tmp_path / "reference")
    with counted_predict(monkeypatch, kill_at=2), pytest.raises(Killed):
        _classifier_run(store, y, tmp_path / "killed")
    good_path = tmp_path / "killed" / RESUME_FILE
    good = good_path.read_bytes()
    tensors, meta = load_tensors(good_path)
    cases = _bad_resume_files(good, tensors, meta)
    for name, content in cases.items():
        resume_dir = tmp_path / "case" / name.replace(" ", "_").replace(";", "")
        if isinstance(content, bytes):
            resume_dir.mkdir(parents=True)
            (resume_dir / RESUME_FILE).write_bytes(content)
        else:
            save_tensors(resume_dir / RESUME_FILE, *content)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.training"):
            model, res = _classifier_run(store, y, resume_dir)  # before the fix: raised, every time
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "discarding" in r.getMessage()]
        assert len(warnings) == 1 and "resuming" not in caplog.text, (name, caplog.text)
        # trained from scratch: the same history and weights as an uninterrupted run
        assert res["history"] == ref_res["history"], name
        for (k, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name}: {k}")
    # control: the untouched file is still resumed
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        caplog.clear()
        _, res = _classifier_run(store, y, tmp_path / "killed")
    assert "resuming from epoch 1" in caplog.text and res["history"] == ref_res["history"]
    # refused: files discarded (training started fresh); violations: files that failed the run or were loaded
    record("attacks.corrupt_resume", cases=len(cases), refused=len(cases), violations=0)


# =================================================================================================
# Shell injection through cycle params
# =================================================================================================

def _dvc_project(root: Path, params: dict):
    """This repo's dvc.yaml with the given params.yaml, as dvc's own parser resolves it (no git)."""
    from dvc.repo import Repo

    root.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    Repo.init(str(root), no_scm=True).close()
    return Repo(str(root))


def _python_shim(folder: Path) -> Path:
    """A `python` that only logs its stage address and arguments: the stage commands run through dvc's
    shell in milliseconds, and whatever else the shell line holds still runs (the injected `touch`)."""
    folder.mkdir()
    shim = folder / "python"
    shim.write_text('#!/bin/sh\nprintf "%s|%s\\n" "$DVC_STAGE" "$*" >> "$SHIM_LOG"\n')
    shim.chmod(0o755)
    return folder / "calls.log"


def test_cycle_params_never_reach_a_shell(tmp_path, monkeypatch, caplog):
    from dvc.stage.run import cmd_run

    from pipeline.stages.common import cycle_arg, stage_main

    hostile = {
        "id": ({"c1": {"id": "1; touch pwned-by-id", "prev": 0}}, "pwned-by-id"),
        "prev": ({"c1": {"id": 1, "prev": "0; touch pwned-by-prev"}}, "pwned-by-prev"),
        "key": ({"c1; touch pwned-by-key": {"id": 1, "prev": 0}}, "pwned-by-key"),
        "key substitution": ({"c1$(touch pwned-by-subst)": {"id": 1, "prev": 0}}, "pwned-by-subst"),
    }
    calls = _python_shim(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{calls.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SHIM_LOG", str(calls))
    ran, expected = 0, []
    for what, (cycles, marker) in hostile.items():
        project = tmp_path / what.replace(" ", "_")
        with _dvc_project(project, {**tiny_params(), "cycles": cycles}) as repo:
            monkeypatch.chdir(project)  # where `dvc repro` runs: stage addresses as it gives them
            per_cycle = [s for s in repo.index.stages if "@" in s.name]
            assert {s.name.split("@")[0] for s in per_cycle} == {"cam", "enhance", "train", "evaluate"}
            for stage in per_cycle:  # each command through dvc's own runner: its shell, its $DVC_STAGE
                assert marker not in stage.cmd, (what, stage.name, stage.cmd)
                cmd_run(stage)
                ran += 1
                expected.append(f"{stage.name}|-m pipeline.stages.{stage.name.split('@')[0]}")
        assert not list(tmp_path.rglob("pwned*")) and not list(ROOT.glob("pwned*")), what
        # what the stage itself then does (in process): the config loader refuses the params, one line
        monkeypatch.setenv("DVC_STAGE", per_cycle[0].name)
        monkeypatch.setattr(sys, "argv", ["train", "--params", str(project / "params.yaml"), "--root", str(project)])
        caplog.clear()
        with pytest.raises(SystemExit) as exit_, caplog.at_level(logging.ERROR):
            stage_main("train", train_stage.run, cycle_arg)
        assert exit_.value.code == 2
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["train failed"], caplog.text
        assert "train failed: cycles" in caplog.text, caplog.text
    assert calls.read_text().splitlines() == expected  # each stage ran once, with no argument from params
    # control: valid params keep the stage names, and a stage's address names its cycle
    with _dvc_project(tmp_path / "valid", tiny_params()) as repo:
        names = {s.name for s in repo.index.stages}
    assert {"train_baseline", "train@c1", "train@c2", "cam@c2", "evaluate@c1", "enhance@c2"} <= names
    params = Params.model_validate(tiny_params())
    assert stage_cycle("train", None, params, "train@c2") == 2
    assert stage_cycle("evaluate", None, params, "dvc.yaml:evaluate@c1") == 1
    assert stage_cycle("train", 0, params, "train_baseline") == 0
    for address in ("train@c9", "train@c1; touch x", "cam@c1", None, "train"):
        with pytest.raises(ConfigError):
            stage_cycle("train", None, params, address)
    # violations: injected shell commands that ran (a marker file)
    record("attacks.shell_injection", cases=len(hostile), refused=len(hostile), violations=0,
           stage_commands_run=ran)


# =================================================================================================
# Dataset paths outside data.root
# =================================================================================================

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


@contextmanager
def opened_files():
    """Every file Python opens inside the block (the interpreter's audit hook: builtins.open, io, os.open)."""
    global _OPENED
    if not getattr(opened_files, "installed", False):
        sys.addaudithook(_audit)  # hooks cannot be removed; it records nothing outside this block
        opened_files.installed = True
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _chexpert(root: Path, outside: Path, rng) -> dict[str, str]:
    """train.csv naming one good film and four that escape root; {CSV Path: expected outcome}."""
    base = root / "CheXpert-v1.0-small"
    write_jpeg(base / "train" / "patient00001" / "study1" / "view1_frontal.jpg", radiograph(rng, 96))
    link = base / "train" / "patient00003" / "study1" / "view1_frontal.jpg"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "secret.jpg")
    (base / "train" / "patient00004").symlink_to(outside, target_is_directory=True)
    paths = {
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg": "read",
        "CheXpert-v1.0-small/../../outside/secret.jpg": "refused",
        "CheXpert-v1.0-small/train/patient00002/../../../../outside/secret.jpg": "refused",
        str(outside / "secret.jpg"): "refused",
        "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg": "refused",
        "CheXpert-v1.0-small/train/patient00004/secret.jpg": "refused",
    }
    with open(base / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CANONICAL_LABELS])
        for path in paths:
            w.writerow([path, "Female", "50", "Frontal", "PA", *(["1.0"] + ["0.0"] * (len(CANONICAL_LABELS) - 1))])
    return paths


def _rsna(root: Path, outside: Path, rng) -> dict[str, str]:
    images = root / "stage_2_train_images"
    write_dicom(images / "good1.dcm", radiograph(rng, 96), patient_id="good1")
    (images / "linked.dcm").symlink_to(outside / "secret.dcm")
    pids = {"good1": "read", "../../outside/secret": "refused", "linked": "refused"}
    with open(root / "stage_2_train_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for pid in pids:
            w.writerow([pid, "", "", "", "", "0"])
    return pids


def _nih(root: Path, outside: Path, rng) -> dict[str, str]:
    write_png(root / "images" / "00000001_000.png", radiograph(rng, 96))
    (root / "images" / "00000002_000.png").symlink_to(outside / "secret.png")
    names = {"00000001_000.png": "read", "00000002_000.png": "refused"}
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Patient ID"])
        for k, name in enumerate(names, 1):
            w.writerow([name, "No Finding", str(k)])
    return names


def test_dataset_paths_outside_data_root_are_quarantined_unread(tmp_path):
    from pipeline.data.prepare import source_module

    rng = np.random.default_rng(0)
    outside = tmp_path / "outside"  # what must never be read: valid films, so reading them would succeed
    write_jpeg(outside / "secret.jpg", radiograph(rng, 96))
    write_png(outside / "secret.png", radiograph(rng, 96))
    write_dicom(outside / "secret.dcm", radiograph(rng, 96), patient_id="secret")
    cases = n_refused = 0
    for source, build in (("chexpert", _chexpert), ("rsna", _rsna), ("nih", _nih)):
        root = tmp_path / f"{source}-root"
        root.mkdir()
        expected = build(root, outside, rng)
        raw = tiny_params()
        raw["data"].update(source=source, root=str(root))
        params = Params.model_validate(raw)
        with opened_files() as opened:
            rows = list(materialise(source_module(source).records(params, "salt")))
        leaked = [p for p in opened if Path(p).resolve().is_relative_to(outside.resolve())]
        assert leaked == [], (source, leaked)
        read = [r for r in rows if isinstance(r, Record)]
        refused = [r for r in rows if isinstance(r, Quarantined) and r.reason == OUTSIDE_ROOT]
        assert len(read) == list(expected.values()).count("read"), (source, rows)
        assert len(refused) == list(expected.values()).count("refused"), (source, rows)
        cases += len(expected)
        n_refused += len(refused)
    record("attacks.dataset_paths", cases=cases, refused=n_refused, leaked=0, sources=3)
