"""Faithfulness of CAMs by ROAD (Rong et al., 2022) through grad-cam's implementation.

ROAD removes the most (MoRF) or least (LeRF) relevant pixels by noisy linear imputation and
watches the model's output; combined = (LeRF drop - MoRF drop) / 2, so higher = more faithful.
grad-cam's imputer reads the channel count from the tensor, so 1-channel (grayscale) inputs work
as they are; its targets are softmax-based, hence the sigmoid target below for multi-label heads.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import ROADCombined
from torch import nn

from pipeline.cam.all_labels import full_precision

log = logging.getLogger(__name__)


class SigmoidLabelTarget:
    """grad-cam target: the sigmoid probability of one label, from one image's (L,) logits."""

    def __init__(self, label_index: int):
        self.label_index = label_index

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output[..., self.label_index])


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
            scores = ROADCombined(percentiles=list(percentiles))(images, cams, targets, model)
    finally:
        model.train(was_training)
    score = float(np.mean(scores))
    log.debug("ROAD label %d over %d images: %.4f", label_index, len(images), score)
    return score
