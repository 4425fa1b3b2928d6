"""Model-randomisation sanity check (Adebayo et al., "Sanity checks for saliency maps", 2018).

A CAM method that explains the model should change when the model's weights are destroyed:
we re-initialise layers from the head back to the input and track how similar the CAMs stay.
A final rank correlation near 0 passes; near 1 means the maps mostly reflect the input (edges).
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

log = logging.getLogger(__name__)

CamFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
MAX_STEPS = 12
SANITY_MAX = 0.2  # a heatmap method passes when the fully randomised model's maps correlate less than this


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman rho over paired (..., h, w) maps; constant or non-finite-only maps are skipped."""
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
    """The layer's own initialiser where it has one, else N(0, 0.02); seeded without touching global RNG."""
    devices = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
        else:
            with torch.no_grad():
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, 0.02)


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
