"""Where a CAM points, against anatomy masks and expert boxes (all maps at image resolution)."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt


def _check(cam, mask) -> tuple[np.ndarray, np.ndarray]:
    cam, mask = np.asarray(cam, dtype=np.float64), np.asarray(mask).astype(bool)
    if cam.ndim != 2 or cam.shape != mask.shape:
        raise ValueError(f"cam {cam.shape} and mask {mask.shape} must be 2-D and the same shape")
    return cam, mask


def energy_share(cam, region) -> float | None:
    """Fraction of the CAM's mass inside `region`; None for an empty CAM (nothing to attribute)."""
    cam, region = _check(cam, region)
    total = cam.sum()
    return float(cam[region].sum() / total) if total > 0 else None


def pointing_game_hit(cam, target, tolerance_px: int = 0) -> bool:
    """Whether the CAM's peak (first argmax) lies within `tolerance_px` (Euclidean) of the target.

    Tolerance absorbs box annotation slack, as in Zhang et al.'s pointing game.
    """
    cam, target = _check(cam, target)
    if not target.any():
        return False
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    if target[peak]:
        return True
    return bool(tolerance_px > 0 and distance_transform_edt(~target)[peak] <= tolerance_px)


def cam_iou(cam, target, threshold: float = 0.5) -> float:
    """IoU of the CAM thresholded at `threshold` x its max with the target; 0.0 for an empty CAM."""
    cam, target = _check(cam, target)
    peak = cam.max()
    if peak <= 0:
        return 0.0
    hot = cam >= threshold * peak
    union = np.logical_or(hot, target).sum()
    return float(np.logical_and(hot, target).sum() / union) if union else 0.0


def boxes_to_mask(boxes: list[tuple[int, int, int, int]], shape) -> np.ndarray:
    """(x, y, w, h) pixel boxes -> bool mask of `shape` (H, W), clipped to the image."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = max(int(round(x)), 0), max(int(round(y)), 0)
        x1, y1 = int(round(x + w)), int(round(y + h))
        mask[y0:max(y1, y0), x0:max(x1, x0)] = True
    return mask
