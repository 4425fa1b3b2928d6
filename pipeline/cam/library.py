"""Grad-CAM through the grad-cam library, one label at a time; low-res float16 for storage.

Heatmaps are stored at `cam.size` (e.g. 16×16 per label) and upsampled on demand, so a dataset's
CAMs stay small. The model is always in eval() mode (BatchNorm uses running statistics).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pipeline.data.dataset import iterate_batches
from pipeline.data.store import ArrayStore
from pipeline.models.registry import target_layer

METHODS = {"gradcam": GradCAM}


class LabelCAM:
    """All labels' CAMs for a batch, computed with the library's per-label call."""

    def __init__(self, model: nn.Module, arch: str, method: str = "gradcam"):
        if method not in METHODS:
            raise ValueError(f"cam.method: unknown method {method!r}; available: {sorted(METHODS)}")
        model.eval()
        self.model = model
        self.cam = METHODS[method](model=model, target_layers=[target_layer(model, arch)])

    def __call__(self, x: torch.Tensor, num_labels: int) -> np.ndarray:
        """(N, L, H, W) float32 in [0, 1] at input resolution, each map min-max normalised."""
        out = np.empty((x.shape[0], num_labels, x.shape[2], x.shape[3]), dtype=np.float32)
        for label in range(num_labels):
            out[:, label] = self.cam(input_tensor=x, targets=[ClassifierOutputTarget(label)] * len(x))
        return out

    def release(self) -> None:
        self.cam.activations_and_grads.release()


def downsample(cams: np.ndarray, size: int) -> np.ndarray:
    """(N, L, H, W) -> (N, L, size, size) by area averaging, as float16 for storage."""
    t = torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32))
    return F.adaptive_avg_pool2d(t, size).numpy().astype(np.float16)


def upsample(cams: np.ndarray, size: int) -> np.ndarray:
    """Low-res (..., h, w) -> (..., size, size) float32, bilinear, for scoring and display."""
    arr = np.asarray(cams, dtype=np.float32)
    lead = arr.shape[:-2]
    t = torch.from_numpy(np.ascontiguousarray(arr.reshape(-1, 1, *arr.shape[-2:])))
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up.numpy().reshape(*lead, size, size)


def dataset_cams(model: nn.Module, arch: str, store: ArrayStore, indices: np.ndarray, num_labels: int,
                 batch_size: int, out_size: int, method: str = "gradcam") -> Iterator[np.ndarray]:
    """Yield low-res float16 CAM batches (n, L, out_size, out_size) in the order of `indices`."""
    cam = LabelCAM(model, arch, method)
    try:
        for x, _, _ in iterate_batches(store, indices, None, batch_size):
            yield downsample(cam(x, num_labels), out_size)
    finally:
        cam.release()
