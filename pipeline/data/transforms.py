"""Model input preparation and training augmentation (albumentations), shared by every stage.

Every stage that feeds a model (train, CAM, evaluate, viewer) calls `to_model_input`, so the
normalisation recorded in a checkpoint is the one used everywhere.
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch

from pipeline.config import AugmentParams

NORMALISATION = {"mean": 0.5, "std": 0.25, "channels": 3}


def to_model_input(images: np.ndarray | torch.Tensor, normalisation: dict = NORMALISATION) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 3, H, W) channels-last, normalised; grayscale repeated for 3-channel nets."""
    x = torch.as_tensor(np.asarray(images)).float().div_(255.0)
    x = x.sub_(normalisation["mean"]).div_(normalisation["std"])
    x = x.unsqueeze(1).expand(-1, normalisation["channels"], -1, -1)
    return x.contiguous(memory_format=torch.channels_last)  # the layout models are built in (registry)


def augmentation(p: AugmentParams, seed: int) -> A.Compose:
    """Geometric and photometric jitter; no horizontal flip: laterality is anatomy (heart on the left)."""
    ops: list = []
    if p.rotate_deg or p.shift or p.scale:
        ops.append(A.Affine(rotate=(-p.rotate_deg, p.rotate_deg), translate_percent=(-p.shift, p.shift),
                            scale=(1 - p.scale, 1 + p.scale), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8))
    if p.brightness_contrast:
        ops.append(A.RandomBrightnessContrast(brightness_limit=p.brightness_contrast,
                                              contrast_limit=p.brightness_contrast, p=0.8))
    if p.noise:
        ops.append(A.GaussNoise(std_range=(p.noise / 2, p.noise), p=0.5))
    return A.Compose(ops, seed=seed)


def augment_batch(transform: A.Compose, images: np.ndarray) -> np.ndarray:
    return np.stack([transform(image=img)["image"] for img in images])
