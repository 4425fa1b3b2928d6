"""Partial fine-tuning: only the last N parameter tensors, or only some named modules, train.

Transfer-learning studies often re-train the top of a pretrained network only (a pneumonia study
re-trained ~38 % of ResNet-101): fewer weights to fit on a small set, and the early, generic
filters stay as pretrained. Frozen parameters get `requires_grad=False`, the optimiser is given
only the trainable ones (pipeline/training.py), and BatchNorm layers whose parameters are all
frozen stay in eval mode while training (`freeze_norms`), so their running statistics do not
drift either: a frozen block computes exactly what it did before fine-tuning.
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def apply_trainable(model: nn.Module, last_n: int | None = None,
                    blocks: list[str] | tuple[str, ...] | None = None) -> tuple[int, int]:
    """Set `requires_grad` on every parameter; returns (trainable elements, total elements).

    `last_n`: the last N parameter tensors in registration order (input to output for the zoo's
    models) train. `blocks`: dotted module names (e.g. ["layer4", "fc"]) whose parameters train.
    Neither: everything trains. Unknown blocks raise ValueError listing the top-level modules.
    """
    if last_n is not None and blocks is not None:
        raise ValueError("set trainable_last_n or trainable_blocks, not both")
    params = list(model.named_parameters())
    if last_n is not None:
        if last_n < 1:
            raise ValueError(f"trainable_last_n must be >= 1, got {last_n}")
        keep = {name for name, _ in params[-last_n:]}
    elif blocks is not None:
        check_blocks(model, blocks)
        prefixes = tuple(b + "." for b in blocks)
        keep = {name for name, _ in params if name.startswith(prefixes) or name in blocks}
    else:
        keep = {name for name, _ in params}
    for name, p in params:
        p.requires_grad_(name in keep)
    n_train = sum(p.numel() for name, p in params if name in keep)
    n_total = sum(p.numel() for _, p in params)
    return n_train, n_total


def check_blocks(model: nn.Module, blocks: list[str] | tuple[str, ...]) -> None:
    """ValueError naming the first block that is not a module with parameters in `model`."""
    for block in blocks:
        try:
            module = model.get_submodule(block)
        except AttributeError:
            top = [name for name, m in model.named_children() if any(True for _ in m.parameters())]
            raise ValueError(f"unknown block {block!r}; top-level modules: {', '.join(top)}") from None
        if not any(True for _ in module.parameters()):
            raise ValueError(f"block {block!r} has no parameters")


def freeze_norms(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen into eval mode (call after `model.train()`).

    Returns how many were switched. With nothing frozen, nothing changes.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                n += 1
    return n
