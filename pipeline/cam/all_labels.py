"""Every label's CAM from one backbone pass.

grad-cam computes one label per call: a full forward and backward each, so 14 labels cost ~38
forward passes on ResNet50. But a label's Grad-CAM needs only the gradient of its logit with respect
to the target layer's activations, and that gradient flows only through the layers *after* the
target. So: run the network once with its parameters frozen (the backbone records no graph), cut the
graph at the target layer's output (a fresh leaf), and get all labels' gradients through the
small tail in one batched backward (`is_grads_batched`, i.e. vmap over the label axis). Every
gradient method (Grad-CAM, Grad-CAM++, HiResCAM, LayerCAM) is a formula over those (activations,
gradients); EigenCAM needs no gradient and is the same map for every label; Score-CAM's masked
forward passes do not depend on the label, so one set serves all labels.

In-place ops after the target layer (DenseNet's `F.relu(features, inplace=True)`) act on a clone
of the leaf, so activations and gradients here both belong to the target layer's output as it was
produced. grad-cam's hooks keep a reference to that tensor, which the in-place ReLU then overwrites:
the library pairs *post*-ReLU activations with *pre*-ReLU gradients (tests/test_cam.py shows both).

Maps are returned on the model's device at the target layer's resolution, ReLU'd and min-max
normalised per map exactly as grad-cam does; `maps.resize` brings them to image size.

Precision: CAMs are always computed in fp32, whatever `compute.precision` says and even inside a
caller's autocast block (autocast is switched off for the forward, backward and formulas). A Grad-CAM is a product of
activations and gradients that is then min-max normalised: in bf16 (8 bits of mantissa) small
gradients round away and near-ties in a map change its peak, so the pointing game and the
sanity rank correlations would move with the precision. fp32 keeps the maps the same on every
setting (tests/test_compute.py); the device still speeds them up. The model only has to be on the
device: inputs are moved to it here.
"""
from __future__ import annotations

import contextlib
import logging
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cam.maps import normalise
from pipeline.models.registry import model_spec

log = logging.getLogger(__name__)

GRADIENT_METHODS = ("gradcam", "gradcam++", "hirescam", "layercam")
METHODS = (*GRADIENT_METHODS, "eigencam", "scorecam")


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration, so the backbone builds no autograd graph."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def full_precision(device: torch.device):
    """A context with autocast off for `device`'s type (see the module docstring: CAMs in fp32)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to switch off
        return contextlib.nullcontext()


class AllLabelCAM:
    """`cam(x)` -> (N, L, h, w) maps in [0, 1] for every label, from one forward pass.

    `labels` restricts the output to some label indices (all by default). The model is put in
    eval() mode: BatchNorm uses its running statistics, dropout is off.
    """

    def __init__(self, model: nn.Module, arch: str, method: str = "gradcam", scorecam_batch: int = 64):
        if method not in METHODS:
            raise ValueError(f"cam.method: unknown method {method!r}; available: {', '.join(METHODS)}")
        spec = model_spec(arch)
        self.model, self.method, self.scorecam_batch = model.eval(), method, scorecam_batch
        self.layer = model.get_submodule(spec.target_layer)
        self.reshape = spec.reshape

    def _grid(self, t: torch.Tensor) -> torch.Tensor:
        """Target-layer tensor (N, ..., C) or (N, C, h, w) -> (N, C, h, w); leading label axes kept."""
        return self.reshape(t) if self.reshape is not None else t

    def forward_with_cut(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, L), target activations as a graph leaf): the one forward pass."""
        captured: dict[str, torch.Tensor] = {}

        def cut(module, inputs, output):
            leaf = output.detach().requires_grad_(True)
            captured["a"] = leaf
            return leaf.clone()  # in-place ops downstream modify the clone, never the leaf

        device = next(self.model.parameters()).device
        handle = self.layer.register_forward_hook(cut)
        try:
            with _frozen(self.model), torch.enable_grad(), full_precision(device):
                logits = self.model(x.to(device))
        finally:
            handle.remove()
        if "a" not in captured:
            raise RuntimeError("the target layer was not called in the forward pass")
        return logits, captured["a"]

    @staticmethod
    def label_gradients(logits: torch.Tensor, leaf: torch.Tensor, labels: list[int]) -> torch.Tensor:
        """d logit_l / d activations for every label l at once: (len(labels), *leaf.shape)."""
        n_labels = len(labels)
        onehot = torch.zeros(n_labels, *logits.shape, device=logits.device, dtype=logits.dtype)
        onehot[torch.arange(n_labels), :, torch.as_tensor(labels)] = 1.0
        try:
            (grads,) = torch.autograd.grad(logits, leaf, grad_outputs=onehot, is_grads_batched=True,
                                           retain_graph=True)
            return grads
        except RuntimeError as err:  # an op in the tail without a vmap rule: one backward per label
            log.debug("batched backward unavailable (%s); looping over labels", err)
            return torch.stack([torch.autograd.grad(logits, leaf, grad_outputs=onehot[k], retain_graph=True)[0]
                                for k in range(n_labels)])

    def __call__(self, x: torch.Tensor, labels: list[int] | None = None) -> torch.Tensor:
        with full_precision(next(self.model.parameters()).device):  # forward, backward and formulas
            return self._maps(x, labels)

    def _maps(self, x: torch.Tensor, labels: list[int] | None) -> torch.Tensor:
        logits, leaf = self.forward_with_cut(x)
        labels = list(range(logits.shape[1])) if labels is None else list(labels)
        acts = self._grid(leaf.detach())                                   # (N, C, h, w)
        if self.method == "eigencam":
            from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

            proj = torch.from_numpy(get_2d_projection(acts.float().cpu().numpy())).to(acts.device)
            cams = proj[:, None].expand(-1, len(labels), -1, -1)
        elif self.method == "scorecam":
            cams = self._scorecam(x.to(acts.device), acts, labels)
        else:
            grads = self._grid(self.label_gradients(logits, leaf, labels))  # (L, N, C, h, w)
            cams = _gradient_cam(self.method, acts, grads).transpose(0, 1)  # (N, L, h, w)
        return normalise(cams.float())

    @torch.no_grad()
    def _scorecam(self, x: torch.Tensor, acts: torch.Tensor, labels: list[int]) -> torch.Tensor:
        """Score-CAM with grad-cam's masks (align_corners bilinear, per-channel min-max): the masked
        images' logits serve every label, so the C forward passes per image are done once."""
        up = F.interpolate(acts.float(), size=x.shape[-2:], mode="bilinear", align_corners=True)
        flat = up.flatten(2)
        lo, hi = flat.min(-1)[0][..., None, None], flat.max(-1)[0][..., None, None]
        masks = (up - lo) / (hi - lo + 1e-8)                                # (N, C, H, W)
        weights = []
        for n in range(x.shape[0]):
            masked = x[n][None] * masks[n][:, None]                         # (C, 3, H, W)
            scores = torch.cat([self.model(masked[i:i + self.scorecam_batch])
                                for i in range(0, len(masked), self.scorecam_batch)])  # (C, L)
            weights.append(torch.softmax(scores[:, labels].T, dim=-1))      # (L, C)
        w = torch.stack(weights)                                            # (N, L, C)
        return torch.einsum("nlc,nchw->nlhw", w, acts.float())


def _gradient_cam(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(L, N, h, w) raw maps from activations (N, C, h, w) and per-label gradients (L, N, C, h, w).

    The formulas are grad-cam's (grad_cam.py, grad_cam_plusplus.py, hirescam.py, layer_cam.py).
    """
    acts, grads = acts.float(), grads.float()
    if method == "gradcam":
        weights = grads.mean(dim=(-2, -1))                                   # (L, N, C)
        return torch.einsum("lnc,nchw->lnhw", weights, acts)
    if method == "gradcam++":
        g2 = grads * grads
        g3 = g2 * grads
        sum_acts = acts.sum(dim=(-2, -1))[None, :, :, None, None]
        aij = g2 / (2 * g2 + sum_acts * g3 + 1e-6)
        aij = torch.where(grads != 0, aij, torch.zeros_like(aij))
        weights = (torch.relu(grads) * aij).sum(dim=(-2, -1))
        return torch.einsum("lnc,nchw->lnhw", weights, acts)
    if method == "hirescam":
        return (grads * acts[None]).sum(dim=2)
    if method == "layercam":
        return (torch.relu(grads) * acts[None]).sum(dim=2)
    raise ValueError(f"not a gradient method: {method!r}")


def dataset_cams(model: nn.Module, arch: str, batches, method: str = "gradcam",
                 size: int | None = None) -> Iterator[np.ndarray]:
    """Low-res float16 CAMs (n, L, s, s) for each input batch of `batches` (an iterable of tensors)."""
    from pipeline.cam.maps import to_storage

    cam = AllLabelCAM(model, arch, method)
    for x in batches:
        yield to_storage(cam(x), size)
