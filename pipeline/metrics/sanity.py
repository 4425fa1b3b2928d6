"""Saliency sanity checks (Adebayo et al., "Sanity checks for saliency maps", 2018).

A CAM method that explains the model should change when what the model learned is destroyed.
Two ways to destroy it, each scored by the rank correlation of the CAMs with the model's own:

- cascading model-parameter randomisation: re-initialise layers from the head back to the input
  (`cascading_randomization`);
- label permutation (the "data randomisation test"): train the same architecture from the same
  init on the same images with their labels randomly permuted, so nothing but memorisation can be
  learned (`label_permutation`; the training itself is the caller's callback).

A rank correlation near 0 passes (below SANITY_MAX); near 1 means the maps mostly reflect the input
(edges, the architecture's prior), not what the model learned from the labels.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Mapping

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

log = logging.getLogger(__name__)

CamFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
MAX_STEPS = 12
SANITY_MAX = 0.2  # a heatmap method passes when the fully randomised model's maps correlate less than this


def _rank_correlations(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Spearman rho of every informative pair of (..., h, w) maps (constant or non-finite-only skipped)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"map shapes differ: {a.shape} vs {b.shape}")
    a, b = a.reshape(-1, a.shape[-2] * a.shape[-1]), b.reshape(-1, b.shape[-2] * b.shape[-1])
    rhos = []
    for x, y in zip(a, b):
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        rho = spearmanr(x, y).statistic
        if np.isfinite(rho):
            rhos.append(float(rho))
    return rhos


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman rho over paired (..., h, w) maps; constant or non-finite-only maps are skipped."""
    rhos = _rank_correlations(a, b)
    return float(np.mean(rhos)) if rhos else 0.0


def _blocks(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Modules owning parameters directly, head first, split into at most MAX_STEPS groups."""
    owners = [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    owners.reverse()
    if not owners:
        return []
    bounds = np.linspace(0, len(owners), min(MAX_STEPS, len(owners)) + 1).round().astype(int)
    return [owners[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def _reinit(module: nn.Module, seed: int) -> None:
    """The layer's own initialiser where it has one, else N(0, 0.02); seeded without touching global RNG.

    The draws are made on the CPU whatever the module's device (its parameters visit the CPU and go
    back): a GPU's generator gives other numbers for the same seed, and the randomised model, so the
    sanity figure, would then depend on the hardware rather than on `seed`."""
    params = list(module.parameters(recurse=False))
    away = {p: p.data for p in params if p.device.type != "cpu"}
    for p, data in away.items():
        p.data = data.cpu()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                with torch.no_grad():
                    for p in params:
                        p.normal_(0.0, 0.02)
    finally:
        for p, data in away.items():
            data.copy_(p.data)
            p.data = data


def _cams(model: nn.Module, images: torch.Tensor, cam_fn: CamFn) -> np.ndarray:
    cams = cam_fn(model, images)
    return (cams.detach().cpu().float().numpy() if torch.is_tensor(cams) else np.asarray(cams, np.float32))


def cascading_randomization(model: nn.Module, images: torch.Tensor, cam_fn: CamFn, seed: int = 0) -> dict:
    """Rank correlation of CAMs to the original model's after each cascading re-initialisation step.

    Works on a deep copy; the original's weights are untouched (its train/eval flag is restored).
    """
    was_training = model.training
    model.eval()
    try:
        reference = _cams(model, images, cam_fn)
    finally:
        model.train(was_training)
    rand = copy.deepcopy(model).eval()
    steps = []
    for step, group in enumerate(_blocks(rand)):
        for j, (name, module) in enumerate(group):
            _reinit(module, seed * 100_003 + step * 1_009 + j)
        rand.eval()
        rho = rank_correlation(reference, _cams(rand, images, cam_fn))
        steps.append({"randomized_upto": group[-1][0], "rank_corr": rho})
        log.debug("sanity: randomised up to %s, rank corr %.3f", group[-1][0], rho)
    final = steps[-1]["rank_corr"] if steps else rank_correlation(reference, _cams(rand, images, cam_fn))
    log.info("sanity check: rank correlation after full randomisation %.3f over %d steps", final, len(steps))
    return {"steps": steps, "final_rank_corr": float(final)}


TrainFn = Callable[[dict[str, np.ndarray]], "tuple[nn.Module, dict]"]


def permute_labels(targets: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Each array's rows (one label vector per image) shuffled among its images, seeded.

    Rows move whole, so each label's prevalence, the labels' co-occurrence and the unknown (NaN)
    pattern are kept; which image carries which labels is destroyed. Arrays are permuted in key
    order from one generator, so the result depends on `seed` and the arrays alone.
    """
    rng = np.random.default_rng(seed)
    return {key: np.asarray(targets[key])[rng.permutation(len(targets[key]))] for key in sorted(targets)}


def label_permutation(references: Mapping[str, nn.Module], images: torch.Tensor, cam_fn: CamFn,
                      train_fn: TrainFn, targets: Mapping[str, np.ndarray], seed: int = 0,
                      max_corr: float = SANITY_MAX) -> dict:
    """The data randomisation test in one call: `train_fn(permute_labels(targets, seed))` trains the
    twin (same architecture, init recipe and epochs as the references' baseline) and returns
    `(twin, info)`; this module never sees how. Then `compare_with_twin`."""
    twin, info = train_fn(permute_labels(targets, seed))
    return compare_with_twin(references, images, cam_fn, twin, info, seed, max_corr)


def compare_with_twin(references: Mapping[str, nn.Module], images: torch.Tensor, cam_fn: CamFn, twin: nn.Module,
                      info: Mapping | None = None, seed: int = 0, max_corr: float = SANITY_MAX) -> dict:
    """CAMs of models trained on true labels vs those of a twin trained on permuted ones.

    Each reference's CAMs on `images` are rank-correlated with the twin's; a reference passes when
    the correlation is below `max_corr` and at least one map pair was informative (a twin whose
    maps are all constant proves nothing). References keep their weights and train/eval flags.

    Returns {"seed", "max", "rank_corr": {name: rho}, "n_maps": {name: informative pairs},
    "passed": {name: bool}, "twin": info}.
    """
    twin.eval()
    twin_cams = _cams(twin, images, cam_fn)
    out: dict = {"seed": seed, "max": max_corr, "rank_corr": {}, "n_maps": {}, "passed": {},
                 "twin": dict(info or {})}
    for name, model in references.items():
        was_training = model.training
        model.eval()
        try:
            rhos = _rank_correlations(_cams(model, images, cam_fn), twin_cams)
        finally:
            model.train(was_training)
        rho = float(np.mean(rhos)) if rhos else None
        out["rank_corr"][name], out["n_maps"][name] = rho, len(rhos)
        out["passed"][name] = rho is not None and rho < max_corr
        log.info("label permutation: %s vs the permuted-label twin, rank corr %s over %d maps", name,
                 "n/a" if rho is None else f"{rho:.3f}", len(rhos))
    return out
