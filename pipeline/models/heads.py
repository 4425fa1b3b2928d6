"""Global pooling and classifier heads, shared by every CNN in the zoo.

Options are typed (`Pool`, `Head`, `Dropout`) so the registry can check a model's `model_kwargs`
from its builder's signature alone, before anything is built.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from torch import nn

Pool = Literal["avg", "max"]
Head = Literal["linear", "bn_mlp"]
Dropout = Annotated[float, Field(ge=0, lt=1)] | None   # None = the architecture's own default

BN_MLP_HIDDEN = 256
BN_MLP_DROPOUT = 0.45  # the published cardiomegaly head (Keras: BatchNorm, Dense 256 relu, Dropout .45)


def global_pool(kind: Pool) -> nn.Module:
    """(N, C, h, w) -> (N, C, 1, 1). Max pooling keeps the single strongest location per channel:
    a small finding is not averaged away (its Grad-CAM gradient is sparse: one cell per channel)."""
    return nn.AdaptiveMaxPool2d(1) if kind == "max" else nn.AdaptiveAvgPool2d(1)


class DropoutLinear(nn.Linear):
    """Dropout then Linear, with a plain Linear's state-dict keys (`weight`, `bias`), so weights
    saved without dropout still load."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0):
        super().__init__(in_features, out_features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return super().forward(self.dropout(x))


def bn_mlp(in_features: int, num_classes: int, dropout: float | None = None) -> nn.Sequential:
    """BatchNorm1d -> Linear(256) -> ReLU -> Dropout -> Linear: the head of published cardiomegaly
    work on EfficientNet-B3 (BatchNorm with Keras' defaults: momentum 0.99, eps 1e-3)."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features, eps=1e-3, momentum=0.01),
        nn.Linear(in_features, BN_MLP_HIDDEN), nn.ReLU(inplace=True),
        nn.Dropout(BN_MLP_DROPOUT if dropout is None else dropout),
        nn.Linear(BN_MLP_HIDDEN, num_classes),
    )


def classifier_head(kind: Head, in_features: int, num_classes: int, dropout: float | None) -> nn.Module:
    """A new head over pooled features (N, in_features) -> logits (N, num_classes)."""
    if kind == "bn_mlp":
        return bn_mlp(in_features, num_classes, dropout)
    return DropoutLinear(in_features, num_classes, dropout or 0.0)
