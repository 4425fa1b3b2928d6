"""What a model's first convolution sees: 1 or 3 channels, in the normalisation its weights expect.

Every stage feeds models the same tensor (`pipeline.data.transforms.to_model_input`: grayscale
repeated to 3 channels, normalised with `NORMALISATION`). Pretrained weights expect other inputs:
torchxrayvision's are 1-channel images scaled to [-1024, 1024], torchvision's ImageNet weights use
per-channel ImageNet statistics. Rather than teach every stage (train, CAM, evaluate, viewer) about
each, the model converts its own input: an `InputAdapter` runs inside the first convolution
(`AdaptedConv2d`), so module names, state-dict keys and Grad-CAM target layers stay as they were,
and a checkpoint rebuilt from its `model_kwargs` (`in_chans`, `input_norm`) converts the same way
without the weights file.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

InChans = Literal[1, 3]
InputNorm = Literal["pipeline", "imagenet", "inception", "xrv"]

# (mean, std) per channel on [0, 1] intensities: the input the weights were trained on is (x - mean) / std.
# "pipeline" is what to_model_input gives already (no conversion for a 3-channel model).
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "pipeline": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),   # torchvision (and most timm CNN) weights
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),              # timm's ViT / MLP-Mixer weights
    "xrv": ((0.5, 0.5, 0.5), (1 / 2048,) * 3),                    # torchxrayvision: (img/255) * 2048 - 1024
}


def _source_norm() -> tuple[float, float]:
    """The (mean, std) of the pipeline's model input (imported late: it pulls in the image stack)."""
    from pipeline.data.transforms import NORMALISATION

    return float(NORMALISATION["mean"]), float(NORMALISATION["std"])


class InputAdapter(nn.Module):
    """The pipeline's model input -> the input the weights expect (`norm`, `channels`).

    Holds no state-dict entries (its constants are non-persistent buffers), so adding it changes
    no checkpoint key.
    """

    def __init__(self, norm: str, channels: int):
        super().__init__()
        if norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {norm!r}; one of {', '.join(INPUT_NORMS)}")
        self.norm, self.channels = norm, channels
        src_mean, src_std = _source_norm()
        mean, std = INPUT_NORMS[norm] or ((src_mean,) * 3, (src_std,) * 3)
        self.register_buffer("source", torch.tensor([src_mean, src_std]), persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(1, keepdim=True) * self.source[1] + self.source[0]   # [0, 1]; the channels are copies
        out = (grey - self.mean) / self.std
        return out.mean(1, keepdim=True) if self.channels == 1 else out

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, channels={self.channels}"


class AdaptedConv2d(nn.Conv2d):
    """A model's first convolution with its `InputAdapter` in front: same keys as a plain Conv2d."""

    def __init__(self, conv: nn.Conv2d, adapter: InputAdapter):
        super().__init__(adapter.channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.adapter(x))


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """(dotted name, module) of the first Conv2d: the stem of every model in the zoo."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d to take the input")


def adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-conv kernel for `channels` inputs from one for 1 or 3, the same response to a grey image:
    3 -> 1 sums over the input channels; 1 -> 3 repeats and divides by 3."""
    have = weight.shape[1]
    if have == channels:
        return weight
    if (have, channels) == (3, 1):
        return weight.sum(1, keepdim=True)
    if (have, channels) == (1, 3):
        return weight.repeat(1, 3, 1, 1) / 3
    raise ValueError(f"cannot adapt a {have}-channel first convolution to {channels} channels")


def apply_input_options(model: nn.Module, in_chans: int = 3, input_norm: str = "pipeline") -> nn.Module:
    """Give `model` a first convolution over `in_chans` channels fed by an `InputAdapter`.

    The defaults (3 channels, the pipeline's normalisation) leave the model as built. A new 1-channel
    kernel is the built one summed over its channels, so a fresh 1-channel model answers a grey image
    as the 3-channel one would.
    """
    if in_chans == 3 and input_norm == "pipeline":
        return model
    name, conv = first_conv(model)
    if conv.groups != 1 or conv.in_channels not in (1, 3):
        raise ValueError(f"{name}: cannot adapt a first convolution with {conv.in_channels} inputs "
                         f"in {conv.groups} groups")
    new = AdaptedConv2d(conv, InputAdapter(input_norm, in_chans))
    with torch.no_grad():
        new.weight.copy_(adapt_channels(conv.weight, in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def input_options(model: nn.Module) -> tuple[int, str]:
    """(input channels of the first convolution, input_norm) of a built model."""
    _, conv = first_conv(model)
    return conv.in_channels, conv.adapter.norm if isinstance(conv, AdaptedConv2d) else "pipeline"
