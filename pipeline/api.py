"""The Python API for a notebook: explain one film with a project's served model, run or load a cycle.

    from pipeline import explain, load_cycle, run_cycle
    e = explain("film.dcm", root="path/to/project")   # probabilities, every label's heatmap, anatomy shares
    c1 = load_cycle("path/to/project", 1)              # cycle 1's scores and its model

`explain` is the viewer's analysis (pipeline/viewer/inference.py: the same decoder, preparation,
one-pass heatmaps and anatomy shares), so a notebook and the viewer give the same numbers.
`run_cycle` is `dvc repro` of that cycle's evaluation, so what it produces is what the pipeline
caches and `dvc repro` would reuse.
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.compute import clean_thread_env
from pipeline.config import Paths, load_params
from pipeline.io import read_json
from pipeline.launch import child_env, require_project
from pipeline.models.checkpoint import load_model
from pipeline.viewer.inference import ImageError, ModelResult, NoModel, ServedModels

log = logging.getLogger(__name__)

__all__ = ["Cycle", "Explanation", "ImageError", "NoModel", "explain", "load_cycle", "run_cycle"]


@dataclass(frozen=True)
class Explanation:
    """One film as one model sees it. Dicts are keyed by label, in the model's label order."""
    cycle: int
    probabilities: dict[str, float]
    thresholds: dict[str, float]               # operating points chosen on val
    heatmaps: dict[str, np.ndarray]            # float32 (S, S) in [0, 1], over `image`
    anatomy_shares: dict[str, float | None]    # heatmap energy inside the label's anatomy (None: no U-Net)
    image: np.ndarray                          # uint8 (S, S): the film as the model saw it
    anatomy: np.ndarray | None                 # uint8 (S, S) bit mask, 1 lungs, 2 heart (None: no U-Net)
    baseline: Explanation | None = None        # the same film through cycle 0

    @property
    def findings(self) -> list[str]:
        """Labels at or above their threshold, most probable first."""
        hits = [k for k, p in self.probabilities.items() if p >= self.thresholds[k]]
        return sorted(hits, key=lambda k: -self.probabilities[k])


@dataclass(frozen=True)
class Cycle:
    """An evaluated cycle: reports/cycles/cK/scores.json and the checkpoint models/cK."""
    cycle: int
    scores: dict
    model: torch.nn.Module                     # in eval mode
    meta: dict                                 # arch, labels, thresholds, normalisation, parent, data hash


@functools.lru_cache(maxsize=4)
def _served(root: Path) -> ServedModels:
    """One set of loaded models per project; it reloads itself when models/latest.json changes."""
    return ServedModels(root)


def explain(image: str | os.PathLike | bytes, root: str | os.PathLike = ".", *, baseline: bool = True) -> Explanation:
    """Explain a PNG, JPEG or DICOM film (a path, or the file's bytes) with the model the project
    serves (models/latest.json), and with cycle 0 beside it unless `baseline` is False.
    Raises NoModel before any cycle is trained, ImageError for a file that cannot be analysed."""
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    analysis = _served(Path(root).resolve()).analyse(data, baseline=baseline)
    labels, thresholds = analysis.labels, dict(zip(analysis.labels, analysis.thresholds))

    def one(result: ModelResult, base: Explanation | None) -> Explanation:
        return Explanation(
            cycle=result.cycle,
            probabilities={k: float(p) for k, p in zip(labels, result.probabilities)},
            thresholds=thresholds,
            heatmaps=dict(zip(labels, result.cams)),
            anatomy_shares=dict(zip(labels, result.shares)),
            image=analysis.image, anatomy=analysis.mask, baseline=base)

    return one(analysis.latest, one(analysis.baseline, None) if analysis.baseline is not None else None)


def load_cycle(root: str | os.PathLike, cycle: int, device: str = "cpu") -> Cycle:
    """Cycle `cycle`'s scores and model, as the pipeline left them in `root`."""
    paths = Paths(root)
    if not paths.cycle_scores(cycle).is_file():
        raise FileNotFoundError(f"cycle {cycle} has not been evaluated in {paths.root}: "
                                f"run_cycle(root, {cycle}) or `cxr-refine repro`")
    model, meta = load_model(paths.model(cycle), device)
    return Cycle(cycle, read_json(paths.cycle_scores(cycle)), model.eval(), meta)


def run_cycle(root: str | os.PathLike = ".", cycle: int | None = None) -> Cycle:
    """Bring cycle `cycle` (default: the last configured) up to date with `dvc repro` of its
    evaluation (and whatever it depends on; cached stages cost nothing), then load it. The stages'
    output goes to this module's logger, line by line."""
    root = require_project(root)
    params_file = Paths(root).params
    params = load_params(params_file)
    stages = {0: "evaluate_baseline", **{item.id: f"evaluate@{key}" for key, item in params.cycles.items()}}
    cycle = params.cycle_ids()[-1] if cycle is None else cycle
    if cycle not in stages:
        raise ValueError(f"cycle {cycle} is not configured in {params_file}; cycles: {sorted(stages)}")
    cmd = [sys.executable, "-m", "dvc", "repro", stages[cycle]]
    log.info("$ %s", " ".join(cmd[1:]))
    # the stages set their own threads (compute.threads): a notebook's OMP_NUM_THREADS must not leak in
    with subprocess.Popen(cmd, cwd=root, env=clean_thread_env(child_env()), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        tail: list[str] = []
        for line in proc.stdout:
            log.info("%s", line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return load_cycle(root, cycle)
