"""Built-in architectures. Inputs are 3-channel (grayscale repeated) so torchvision weights fit."""
from __future__ import annotations

import math

import torch
import torchvision
from torch import nn

from pipeline.models.registry import register_model


def _conv_block(cin: int, cout: int, n_convs: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(n_convs):
        layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class TinyVGG(nn.Module):
    """A small VGG-style CNN that trains at ~200 images/s on two CPU cores at 128 px.

    A stride-2 stem (full-resolution convolutions dominate CPU time), two pooling stages, then a
    last block at 1/8 of the input: a 128 px image gives a 16×16 Grad-CAM, fine enough to tell a
    corner marker from the lungs.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128), dropout: float = 0.2):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, widths[0], 5, stride=2, padding=2, bias=False),
                             nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [stem], widths[0]
        last = len(widths) - 1
        for k, w in enumerate(widths[1:], start=1):
            blocks.append(_conv_block(cin, w, n_convs=2 if k == last else 1, pool=k < last))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def token_grid(prefix_tokens: int):
    """Reshape transform for token layers: (..., prefix + h*w, C) -> (..., C, h, w), dropping class tokens."""
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[..., prefix_tokens:, :]
        side = math.isqrt(grid.shape[-2])
        if side * side != grid.shape[-2]:
            raise ValueError(f"{grid.shape[-2]} tokens do not form a square grid")
        return grid.reshape(*grid.shape[:-2], side, side, grid.shape[-1]).movedim(-1, -3)
    return reshape


@register_model("tinyvgg", target_layer="features.3", classifier="classifier")
def tinyvgg(num_classes: int, image_size: int | None = None, **kw) -> nn.Module:
    return TinyVGG(num_classes, **kw)


@register_model("resnet18", target_layer="layer4", classifier="fc")
def resnet18(num_classes: int, image_size: int | None = None, **kw) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes, **kw)


@register_model("resnet50", target_layer="layer4", classifier="fc")
def resnet50(num_classes: int, image_size: int | None = None, **kw) -> nn.Module:
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kw)


@register_model("densenet121", target_layer="features.norm5", classifier="classifier")
def densenet121(num_classes: int, image_size: int | None = None, **kw) -> nn.Module:
    return torchvision.models.densenet121(weights=None, num_classes=num_classes, **kw)


# ViT: only the class token reaches the head, so the CAM layer is the last block's first LayerNorm
# (its patch tokens still carry the gradient through that block's attention).
@register_model("vit_b_16", target_layer="encoder.layers.encoder_layer_11.ln_1", classifier="heads.head",
                reshape=token_grid(1))
def vit_b_16(num_classes: int, image_size: int | None = None, **kw) -> nn.Module:
    return torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size or 224, **kw)


# MLP-Mixer averages all tokens into the head, so the final LayerNorm keeps one token per patch.
@register_model("mixer_b16", target_layer="norm", classifier="head", reshape=token_grid(0))
def mixer_b16(num_classes: int, image_size: int | None = None, **kw) -> nn.Module:
    import timm

    return timm.create_model("mixer_b16_224", pretrained=False, num_classes=num_classes,
                             img_size=image_size or 224, **kw)
