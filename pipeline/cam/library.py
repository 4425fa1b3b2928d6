"""The grad-cam library's own per-label path: the reference the fast path is tested and benchmarked
against, and the way to run any grad-cam method the fast path does not cover.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torchvision
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from pipeline.models.registry import model_spec

LIBRARY_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
                   "layercam": LayerCAM, "scorecam": ScoreCAM, "eigencam": EigenCAM}


class LibraryCAM:
    """grad-cam, one call per label: (N, L, H, W) float32 in [0, 1] at input resolution."""

    def __init__(self, model: nn.Module, arch: str, method: str = "gradcam"):
        if method not in LIBRARY_METHODS:
            raise ValueError(f"unknown grad-cam method {method!r}; available: {sorted(LIBRARY_METHODS)}")
        spec = model_spec(arch)
        model.eval()
        self.cam = LIBRARY_METHODS[method](model=model, target_layers=[model.get_submodule(spec.target_layer)],
                                           reshape_transform=spec.reshape)

    def __call__(self, x: torch.Tensor, labels: list[int]) -> np.ndarray:
        return np.stack([self.cam(input_tensor=x, targets=[ClassifierOutputTarget(k)] * len(x)) for k in labels], 1)

    def release(self) -> None:
        self.cam.activations_and_grads.release()

    def __enter__(self) -> "LibraryCAM":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _OutOfPlaceReLU:
    """torch.nn.functional, but ReLU never in place (stands in for `F` inside torchvision's densenet)."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def relu(x, inplace=False):
        return torch.relu(x)


@contextmanager
def library_sees_layer_output() -> Iterator[None]:
    """While active, DenseNet's final ReLU runs out of place, so grad-cam's activation hook keeps
    norm5's output as produced (the tensor the fast path uses) instead of the ReLU'd values."""
    module = torchvision.models.densenet
    original = module.F
    module.F = _OutOfPlaceReLU()
    try:
        yield
    finally:
        module.F = original
