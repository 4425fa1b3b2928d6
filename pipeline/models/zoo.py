"""Built-in architectures. Inputs are 3-channel (grayscale repeated) so torchvision weights fit.

Every builder takes `(num_classes, image_size, **options)` with typed keyword options (heads.py),
so `train.model_kwargs` is checked against the signature before anything is built. CNNs share
`pool` (avg | max global pooling) and `head` (linear | bn_mlp); with the defaults each model keeps
its stock torchvision module names, so torchvision state dicts load as they are.
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torchvision
from torch import nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import vgg as tv_vgg

from pipeline.models.heads import Dropout, Head, Pool, classifier_head, global_pool
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

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128), dropout: float | None = None,
                 pool: Pool = "avg", head: Head = "linear"):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, widths[0], 5, stride=2, padding=2, bias=False),
                             nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [stem], widths[0]
        last = len(widths) - 1
        for k, w in enumerate(widths[1:], start=1):
            blocks.append(_conv_block(cin, w, n_convs=2 if k == last else 1, pool=k < last))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = global_pool(pool)
        # the linear head keeps its historical layout (dropout, classifier) so old checkpoints load
        self.dropout = nn.Dropout(0.2 if dropout is None else dropout) if head == "linear" else nn.Identity()
        self.classifier = (nn.Linear(cin, num_classes) if head == "linear"
                           else classifier_head(head, cin, num_classes, dropout))

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


def _set_head(model: nn.Module, pool_attr: str, head_attr: str, in_features: int, num_classes: int,
              pool: Pool, head: Head, dropout: float | None) -> nn.Module:
    """Swap a torchvision CNN's global pooling and classifier modules in place (forward unchanged)."""
    setattr(model, pool_attr, global_pool(pool))
    if head != "linear" or dropout:
        setattr(model, head_attr, classifier_head(head, in_features, num_classes, dropout))
    return model


@register_model("tinyvgg", target_layer="features.3", classifier="classifier")
def tinyvgg(num_classes: int, image_size: int | None = None, widths: tuple[int, ...] = (16, 32, 64, 128),
            dropout: Dropout = None, pool: Pool = "avg", head: Head = "linear") -> nn.Module:
    return TinyVGG(num_classes, widths=widths, dropout=dropout, pool=pool, head=head)


# ----- ResNets: CAM on layer4's output (stride 32) -----------------------------------------------------

def _resnet(builder, num_classes: int, pool: Pool, head: Head, dropout: float | None) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    return _set_head(model, "avgpool", "fc", model.fc.in_features, num_classes, pool, head, dropout)


@register_model("resnet18", target_layer="layer4", classifier="fc")
def resnet18(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
             dropout: Dropout = None) -> nn.Module:
    return _resnet(torchvision.models.resnet18, num_classes, pool, head, dropout)


@register_model("resnet50", target_layer="layer4", classifier="fc")
def resnet50(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
             dropout: Dropout = None) -> nn.Module:
    return _resnet(torchvision.models.resnet50, num_classes, pool, head, dropout)


@register_model("resnet101", target_layer="layer4", classifier="fc")
def resnet101(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
              dropout: Dropout = None) -> nn.Module:
    return _resnet(torchvision.models.resnet101, num_classes, pool, head, dropout)


@register_model("resnet152", target_layer="layer4", classifier="fc")
def resnet152(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
              dropout: Dropout = None) -> nn.Module:
    return _resnet(torchvision.models.resnet152, num_classes, pool, head, dropout)


# ----- VGG: CAM on the last conv block's ReLU, before the final max pool (stride 16, all 512 channels) -----

VggHead = Literal["vgg", "linear", "bn_mlp"]


def _vgg(cfg: str, num_classes: int, pool: Pool, head: VggHead, dropout: float | None) -> nn.Module:
    """head "vgg": torchvision's 4096-4096 classifier over a 7×7 adaptive pool (ImageNet weights load
    whole); "linear"/"bn_mlp": global pooling and a small head (the classifier is then new, and the
    120M-parameter stock one is never allocated)."""
    features = tv_vgg.make_layers(tv_vgg.cfgs[cfg])
    if head == "vgg":
        model = tv_vgg.VGG(features, num_classes=num_classes, dropout=0.5 if dropout is None else dropout)
        if pool == "max":
            model.avgpool = nn.AdaptiveMaxPool2d((7, 7))
        return model
    with torch.device("meta"):  # torchvision's forward; its modules are all replaced below
        model = tv_vgg.VGG(nn.Sequential(), num_classes=1, init_weights=False)
    model.features, model.avgpool = features, global_pool(pool)
    model.classifier = classifier_head(head, 512, num_classes, dropout)
    for m in features.modules():  # torchvision's VGG init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
    return model


@register_model("vgg16", target_layer="features.29", classifier="classifier")
def vgg16(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: VggHead = "vgg",
          dropout: Dropout = None) -> nn.Module:
    return _vgg("D", num_classes, pool, head, dropout)


@register_model("vgg19", target_layer="features.35", classifier="classifier")
def vgg19(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: VggHead = "vgg",
          dropout: Dropout = None) -> nn.Module:
    return _vgg("E", num_classes, pool, head, dropout)


# ----- DenseNet-121 (CheXNet): CAM on norm5, the last feature map before the final ReLU -----------------

class DenseNet(torchvision.models.DenseNet):
    """torchvision's DenseNet with the global pooling as a module (`pool`, no weights), so it can be
    max pooling. The final ReLU stays torchvision's own in-place call (`densenet.F`): the grad-cam
    comparison (pipeline/cam/library.py) swaps exactly that to see norm5's output as produced."""

    def __init__(self, num_classes: int, pool: Pool):
        super().__init__(32, (6, 12, 24, 16), 64, num_classes=num_classes)
        self.pool = global_pool(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tv_densenet.F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(self.pool(out), 1))


_OLD_DENSE_KEY = re.compile(  # torchvision's own pattern for pre-0.3 DenseNet checkpoints
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def chexnet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CheXNet-style DenseNet checkpoints -> torchvision names: `densenet121.` wrapper prefix dropped,
    pre-0.3 `norm.1` -> `norm1`, and its `classifier.0` (Linear in Sequential(Linear, Sigmoid)) ->
    `classifier`. Other state dicts pass through unchanged."""
    wrapped = any(k.startswith("densenet121.") for k in state)
    out = {}
    for key, value in state.items():
        key = _OLD_DENSE_KEY.sub(r"\1\2", key.removeprefix("densenet121."))
        if wrapped and key.startswith("classifier.0."):
            key = "classifier." + key.removeprefix("classifier.0.")
        out[key] = value
    return out


@register_model("densenet121", target_layer="features.norm5", classifier="classifier", key_map=chexnet_keys)
def densenet121(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
                dropout: Dropout = None) -> nn.Module:
    model = DenseNet(num_classes, pool)
    return _set_head(model, "pool", "classifier", model.classifier.in_features, num_classes, pool, head, dropout)


# ----- EfficientNet: CAM on features[-1], the final 1×1 conv block (stride 32) ------------------------

def _efficientnet(builder, num_classes: int, pool: Pool, head: Head, dropout: float | None) -> nn.Module:
    """head "linear" is torchvision's Sequential(Dropout, Linear) (its own dropout unless given);
    "bn_mlp" is the cardiomegaly head: BatchNorm -> Linear(256) -> ReLU -> Dropout -> Linear."""
    model = builder(weights=None, num_classes=num_classes, **({} if dropout is None else {"dropout": dropout}))
    model.avgpool = global_pool(pool)
    if head != "linear":
        model.classifier = classifier_head(head, model.classifier[-1].in_features, num_classes, dropout)
    return model


@register_model("efficientnet_b3", target_layer="features.8", classifier="classifier")
def efficientnet_b3(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
                    dropout: Dropout = None) -> nn.Module:
    return _efficientnet(torchvision.models.efficientnet_b3, num_classes, pool, head, dropout)


@register_model("efficientnet_b4", target_layer="features.8", classifier="classifier")
def efficientnet_b4(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
                    dropout: Dropout = None) -> nn.Module:
    return _efficientnet(torchvision.models.efficientnet_b4, num_classes, pool, head, dropout)


@register_model("efficientnet_b7", target_layer="features.8", classifier="classifier")
def efficientnet_b7(num_classes: int, image_size: int | None = None, pool: Pool = "avg", head: Head = "linear",
                    dropout: Dropout = None) -> nn.Module:
    return _efficientnet(torchvision.models.efficientnet_b7, num_classes, pool, head, dropout)


# ----- token models -------------------------------------------------------------------------------------

# ViT: only the class token reaches the head, so the CAM layer is the last block's first LayerNorm
# (its patch tokens still carry the gradient through that block's attention).
@register_model("vit_b_16", target_layer="encoder.layers.encoder_layer_11.ln_1", classifier="heads.head",
                reshape=token_grid(1))
def vit_b_16(num_classes: int, image_size: int | None = None, dropout: Dropout = None,
             attention_dropout: Dropout = None) -> nn.Module:
    return torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size or 224,
                                       dropout=dropout or 0.0, attention_dropout=attention_dropout or 0.0)


# MLP-Mixer averages all tokens into the head, so the final LayerNorm keeps one token per patch.
@register_model("mixer_b16", target_layer="norm", classifier="head", reshape=token_grid(0))
def mixer_b16(num_classes: int, image_size: int | None = None, dropout: Dropout = None,
              drop_path: Dropout = None) -> nn.Module:
    import timm

    return timm.create_model("mixer_b16_224", pretrained=False, num_classes=num_classes, img_size=image_size or 224,
                             drop_rate=dropout or 0.0, drop_path_rate=drop_path or 0.0)
