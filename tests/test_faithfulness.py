"""Our ROAD imputer against grad-cam's: the same system, the same scores, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADCombined
from torch import nn

from pipeline.metrics.faithfulness import SigmoidLabelTarget, SparseImputer, road_combined


def _film_and_mask(seed: int, side: int = 64, channels: int = 1, keep: float = 0.6):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(channels, side, side)).astype(np.float32)
    mask = (rng.random((side, side)) < keep).astype(np.float32)
    mask[:, 0] = 0          # a missing edge column: neighbours outside the image
    mask[-3:, -3:] = 0      # a missing corner block: missing neighbours of missing pixels
    return img, mask


@pytest.mark.parametrize("seed,channels,keep", [(0, 1, 0.6), (1, 3, 0.2), (2, 1, 0.95), (3, 1, 0.0)])
def test_the_system_is_grad_cams_exactly(seed, channels, keep):
    img, mask = _film_and_mask(seed, channels=channels, keep=keep)
    a_lib, b_lib = NoisyLinearImputer.setup_sparse_system(mask, img, NoisyLinearImputer().weighting)
    a, b = SparseImputer.setup_sparse_system(mask, img)
    lib = a_lib.tocsc()
    lib.sort_indices()
    assert a.shape == lib.shape and a.nnz == lib.nnz > 0
    assert np.array_equal(a.indptr, lib.indptr) and np.array_equal(a.indices, lib.indices)
    assert np.array_equal(a.data, lib.data) and np.array_equal(b, b_lib)


def test_the_imputation_is_grad_cams_exactly():
    img, mask = _film_and_mask(4, side=48)
    torch.manual_seed(7)
    ours = SparseImputer()(torch.from_numpy(img), torch.from_numpy(mask))
    torch.manual_seed(7)
    theirs = NoisyLinearImputer()(torch.from_numpy(img), torch.from_numpy(mask))
    assert torch.equal(ours, theirs)
    kept = torch.from_numpy(mask).bool()
    assert torch.equal(ours[0][kept], torch.from_numpy(img)[0][kept])   # known pixels untouched
    assert not torch.equal(ours, torch.from_numpy(img))                 # the missing ones filled


def test_road_scores_equal_grad_cams_roadcombined():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(64, 3)).eval()
    x = torch.randn(3, 1, 40, 40)
    cams = np.random.default_rng(1).random((3, 40, 40)).astype(np.float32)
    targets = [SigmoidLabelTarget(1)] * 3
    torch.manual_seed(5)
    ours = road_combined(x, cams, targets, model, [20, 40, 60, 80])
    torch.manual_seed(5)
    theirs = ROADCombined(percentiles=[20, 40, 60, 80])(x, cams, targets, model)
    assert ours.shape == (3,) and np.array_equal(ours, theirs)
