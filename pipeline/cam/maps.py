"""Heatmap arrays: normalisation, resizing and float16 storage, shared by every CAM path.

Normalisation and resizing follow grad-cam's `scale_cam_image` exactly (ReLU, min-max per map with
eps 1e-7, bilinear resize with half-pixel centres, renormalise), so a low-resolution map from the
fast path, upsampled here, equals the library's full-resolution output.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-7


def normalise(cams: torch.Tensor) -> torch.Tensor:
    """ReLU, then min-max each (h, w) map to [0, 1] (a constant map becomes 0)."""
    cams = torch.relu(cams)
    cams = cams - cams.amin(dim=(-2, -1), keepdim=True)
    return cams / (EPS + cams.amax(dim=(-2, -1), keepdim=True))


def resize(cams: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., H, W): bilinear (as cv2.resize), renormalised; area-averaged when shrinking."""
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    lead, hw = cams.shape[:-2], cams.shape[-2:]
    if tuple(hw) == out_hw:
        return cams
    flat = cams.reshape(-1, 1, *hw).float()
    if out_hw[0] <= hw[0] and out_hw[1] <= hw[1]:
        flat = F.adaptive_avg_pool2d(flat, out_hw)
    else:
        flat = F.interpolate(flat, size=out_hw, mode="bilinear", align_corners=False)
    return normalise(flat.reshape(*lead, *out_hw))


def upsample(cams: np.ndarray, size: int) -> np.ndarray:
    """Stored low-res maps (..., h, w) -> (..., size, size) float32 in [0, 1], for scoring and display."""
    return resize(torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32)), size).numpy()


def to_storage(cams: torch.Tensor, size: int | None = None) -> np.ndarray:
    """(N, L, h, w) maps -> float16 numpy, resized to `size` first if given."""
    if size is not None:
        cams = resize(cams, size)
    return cams.detach().to("cpu", torch.float16).numpy()
