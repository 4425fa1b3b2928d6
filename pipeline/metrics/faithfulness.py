"""Faithfulness of CAMs by ROAD (Rong et al., 2022) through grad-cam's implementation.

ROAD removes the most (MoRF) or least (LeRF) relevant pixels by noisy linear imputation and
watches the model's output; combined = (LeRF drop - MoRF drop) / 2, so higher = more faithful.
grad-cam's imputer reads the channel count from the tensor, so 1-channel (grayscale) inputs work
as they are; its targets are softmax-based, hence the sigmoid target below for multi-label heads.

One part is our own: `SparseImputer` builds grad-cam's equation system as one COO matrix where
grad-cam fills a `lil_matrix` by fancy assignment, which was a third of the imputation's time. The
system, and so every score, is bit-identical to grad-cam's (tests/test_faithfulness.py).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from pytorch_grad_cam.metrics.perturbation_confidence import (AveragerAcrossThresholds, PerturbationConfidenceMetric,
                                                               RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve
from torch import nn

from pipeline.cam.all_labels import full_precision

log = logging.getLogger(__name__)


class SigmoidLabelTarget:
    """grad-cam target: the sigmoid probability of one label, from one image's (L,) logits."""

    def __init__(self, label_index: int):
        self.label_index = label_index

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output[..., self.label_index])


class SparseImputer(NoisyLinearImputer):
    """grad-cam's noisy linear imputer with its system built in one go (same matrix, same solve, same noise)."""

    @staticmethod
    def setup_sparse_system(mask: np.ndarray, img: np.ndarray, weights=neighbors_weights) -> tuple[csc_matrix, np.ndarray]:
        """grad-cam's `setup_sparse_system`, step for step, with the matrix's entries collected as COO triplets."""
        maskflt = mask.flatten()
        imgflat = img.reshape((img.shape[0], -1))
        indices = np.argwhere(maskflt == 0).flatten()
        coords_to_vidx = np.zeros(len(maskflt), dtype=int)
        coords_to_vidx[indices] = np.arange(len(indices))
        n = len(indices)
        b = np.zeros((n, img.shape[0]))
        sum_neighbors = np.ones(n)
        rows, cols, vals = [], [], []
        for offset, weight in weights:
            valid, new_coords = NoisyLinearImputer.add_offset_to_indices(indices, offset, mask.shape)
            valid_coords = new_coords[valid]
            valid_ids = np.argwhere(valid == 1).flatten()
            known = maskflt[valid_coords] > 0.5
            b[valid_ids[known], :] -= weight * imgflat[:, valid_coords[known]].T
            unknown = maskflt[valid_coords] < 0.5
            rows.append(valid_ids[unknown])
            cols.append(coords_to_vidx[valid_coords[unknown]])
            vals.append(np.full(len(rows[-1]), weight))
            invalid = np.argwhere(valid == 0).flatten()
            sum_neighbors[invalid] = sum_neighbors[invalid] - weight
        diagonal = np.arange(n)
        # one offset reaches each neighbour, so no (row, col) repeats and COO's summing changes nothing
        a = csc_matrix((np.concatenate(vals + [-sum_neighbors]),
                        (np.concatenate(rows + [diagonal]), np.concatenate(cols + [diagonal]))), shape=(n, n))
        a.sort_indices()
        return a, b

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # grad-cam's own __call__, line for line: it names `NoisyLinearImputer.setup_sparse_system`, so
        # overriding that method alone would not reach it
        imgflt = img.reshape(img.shape[0], -1)
        indices_linear = np.argwhere(mask.reshape(-1) == 0).flatten()
        a, b = self.setup_sparse_system(mask.numpy(), img.numpy())
        res = torch.tensor(spsolve(a, b), dtype=torch.float)
        img_infill = imgflt.clone()
        img_infill[:, indices_linear] = res.t() + self.noise * torch.randn_like(res.t())
        return img_infill.reshape_as(img)


def road_combined(images: torch.Tensor, cams: np.ndarray, targets: list, model: nn.Module,
                  percentiles: list[int]) -> np.ndarray:
    """grad-cam's `ROADCombined` with `SparseImputer` (LeRF first, then MoRF, as grad-cam draws the noise)."""
    def averaged(removal):
        return AveragerAcrossThresholds(lambda p: PerturbationConfidenceMetric(removal(p, SparseImputer())),
                                        percentiles)

    lerf = averaged(RemoveLeastRelevantFirst)(images, cams, targets, model)
    morf = averaged(RemoveMostRelevantFirst)(images, cams, targets, model)
    return (lerf - morf) / 2


def road_score(model: nn.Module, images: torch.Tensor, cams: np.ndarray, label_index: int,
               percentiles=(20, 40, 60, 80), *, seed: int = 0) -> float:
    """Mean combined ROAD score of `cams` (N, H, W) for one label; `seed` fixes the imputation noise.

    CAMs are clipped to [0, 1] because ROAD's LeRF ranks pixels by 1 - cam. The model runs in eval()
    mode (its flag is restored afterwards) so dropout/BatchNorm do not blur the comparison. `images`
    go to the model's device (the imputation itself runs on the CPU, where its seeded noise is drawn);
    the forwards run in fp32 like the CAMs they score (pipeline/cam/all_labels.py).
    """
    cams = np.clip(np.asarray(cams, dtype=np.float32), 0.0, 1.0)
    if images.ndim != 4 or cams.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"cams {cams.shape} must be (N, H, W) matching images {tuple(images.shape)}")
    first = next(model.parameters(), None)
    if first is not None:
        images = images.to(first.device)
    targets = [SigmoidLabelTarget(label_index)] * len(images)
    was_training = model.training
    model.eval()
    devices = [images.device.index or 0] if images.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices), full_precision(images.device):
            torch.manual_seed(seed)  # the imputer's noise is torch.randn_like on CPU
            scores = road_combined(images, cams, targets, model, list(percentiles))
    finally:
        model.train(was_training)
    score = float(np.mean(scores))
    log.debug("ROAD label %d over %d images: %.4f", label_index, len(images), score)
    return score
