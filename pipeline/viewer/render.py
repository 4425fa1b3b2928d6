"""Pictures for the viewer, made in memory: heatmap and anatomy overlays as PNG bytes / data URIs.

Nothing here touches the disk: the UI shows images as inline data URIs and the API returns them
base64-encoded, so no upload or derived picture ever becomes a file in the workspace.
"""
from __future__ import annotations

import base64

import cv2
import numpy as np

from pipeline.data.record import HEART_BIT, LUNGS_BIT

DISPLAY = 320  # px side of pictures in the UI


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W) gray or (H, W, 3) RGB -> PNG bytes."""
    arr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def b64png(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + b64png(image)


def heatmap_gray(cam: np.ndarray) -> np.ndarray:
    """float [0, 1] (S, S) -> uint8: the raw heatmap the API returns."""
    return np.clip(np.asarray(cam, dtype=np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)


def _upscale(a: np.ndarray, size: int, interp=cv2.INTER_LINEAR) -> np.ndarray:
    return a if a.shape[0] == size else cv2.resize(a, (size, size), interpolation=interp)


def overlay(image: np.ndarray, cam: np.ndarray, size: int = DISPLAY, weight: float = 0.5) -> np.ndarray:
    """The image under a jet-coloured heatmap (as grad-cam's show_cam_on_image), RGB uint8 size x size."""
    gray = _upscale(image, size).astype(np.float32) / 255.0
    heat = cv2.applyColorMap(heatmap_gray(_upscale(cam.astype(np.float32), size)), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    out = (1 - weight) * gray[..., None] + weight * heat
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def anatomy_overlay(image: np.ndarray, mask: np.ndarray | None, size: int = DISPLAY,
                    highlight: str | None = None) -> np.ndarray:
    """The image with the predicted lungs (green) and heart (magenta) outlined; the label's anatomy
    (`highlight`: lungs | heart | both) lightly filled."""
    rgb = np.repeat(_upscale(image, size)[..., None], 3, axis=2).copy()
    if mask is None:
        return rgb
    m = _upscale(mask, size, cv2.INTER_NEAREST)
    colours = {"lungs": (LUNGS_BIT, (40, 220, 90)), "heart": (HEART_BIT, (230, 60, 220))}
    for name, (bit, colour) in colours.items():
        region = ((m & bit) > 0).astype(np.uint8)
        if highlight in (name, "both"):
            tint = np.zeros_like(rgb)
            tint[:] = colour
            sel = region.astype(bool)
            rgb[sel] = (0.75 * rgb[sel] + 0.25 * tint[sel]).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(rgb, contours, -1, colour, 2)
    return rgb


BOX_COLOURS = {"evidence": (40, 200, 90), "shortcut": (235, 50, 50)}


def boxes_overlay(image: np.ndarray, boxes: list[dict], size: int = DISPLAY,
                  corner: tuple[int, int] | None = None) -> np.ndarray:
    """The film (RGB, size x size) with reviewers' boxes outlined (evidence green, shortcut red), boxes in
    the film's own pixels; `corner`, a box's first corner while it is being set, as a yellow cross."""
    rgb = np.repeat(_upscale(image, size)[..., None], 3, axis=2).copy()
    scale = size / image.shape[-1]
    for b in boxes:
        x0, y0 = int(b["x"] * scale), int(b["y"] * scale)
        x1, y1 = int((b["x"] + b["w"]) * scale) - 1, int((b["y"] + b["h"]) * scale) - 1
        cv2.rectangle(rgb, (x0, y0), (max(x0, x1), max(y0, y1)), BOX_COLOURS.get(b.get("kind"), (255, 255, 255)), 2)
    if corner is not None:
        cx, cy = int((corner[0] + 0.5) * scale), int((corner[1] + 0.5) * scale)
        cv2.drawMarker(rgb, (cx, cy), (250, 220, 40), cv2.MARKER_CROSS, 12, 2)
    return rgb
