"""One model registry: every stage (train, CAM, evaluate, viewer) builds models the same way.

`create_model(name, num_classes)` returns a torch module with random weights unless a local weights
file is given (nothing is ever downloaded). Each entry names its Grad-CAM target layer, so CAM code
never guesses. A builder's keyword options (`train.model_kwargs`) are typed in its signature and
checked against it before anything is built, so a typo fails in `python -m pipeline.config`.
Every model also takes `in_chans` (1 | 3) and `input_norm` (pipeline/models/inputs.py): the input its
first convolution expects, which pretrained weights decide (pipeline/models/pretrained.py).
"""
from __future__ import annotations

import functools
import inspect
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from pipeline.models.inputs import InChans, InputNorm, apply_input_options
from pipeline.models.pretrained import StateDict, load_pretrained, read_state_dict  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    target_layer: str          # dotted module path of the CAM target layer
    classifier: str            # dotted path of the head (its keys may differ in weights files)
    # token layers (ViT, MLP-Mixer): (..., tokens, C) -> (..., C, h, w); None for conv layers
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None
    # renames a weights file's keys to this model's (e.g. CheXNet's DenseNet checkpoints); None = as is
    key_map: Callable[[StateDict], StateDict] | None = None


_REGISTRY: dict[str, ModelSpec] = {}
_FIXED_ARGS = ("num_classes", "image_size")   # given by the pipeline, not by model_kwargs


def register_model(name: str, target_layer: str, classifier: str,
                   reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   key_map: Callable[[StateDict], StateDict] | None = None):
    """Decorator: register `builder(num_classes, image_size, **options) -> nn.Module` under `name`.

    Options must be keyword parameters with type annotations and defaults (no `**kw`): they are
    what `model_kwargs` may set.
    """
    def wrap(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, _with_input_options(builder), target_layer, classifier, reshape, key_map)
        return builder
    return wrap


def _with_input_options(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`builder` plus the options every model shares, `in_chans` and `input_norm`, in its signature
    (so model_kwargs are checked against them too) and applied to the first convolution."""
    @functools.wraps(builder)
    def build(*args, in_chans: InChans = 3, input_norm: InputNorm = "pipeline", **kwargs) -> nn.Module:
        return apply_input_options(builder(*args, **kwargs), in_chans, input_norm)

    sig = inspect.signature(builder)
    extra = [inspect.Parameter("in_chans", inspect.Parameter.KEYWORD_ONLY, default=3, annotation=InChans),
             inspect.Parameter("input_norm", inspect.Parameter.KEYWORD_ONLY, default="pipeline",
                               annotation=InputNorm)]
    build.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    build.__annotations__ = {**typing.get_type_hints(builder, include_extras=True),
                             "in_chans": InChans, "input_norm": InputNorm}
    return build


def list_models() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_options(name: str) -> dict[str, tuple[object, object]]:
    """The options `model_kwargs` may set for `name`: {option: (type annotation, default)}."""
    builder = model_spec(name).builder
    hints = typing.get_type_hints(builder, include_extras=True)
    return {p.name: (hints.get(p.name, typing.Any), p.default)
            for p in inspect.signature(builder).parameters.values()
            if p.name not in _FIXED_ARGS and p.kind is not inspect.Parameter.VAR_KEYWORD}


def validate_kwargs(name: str, kwargs: dict | None) -> dict:
    """Check `model_kwargs` against the builder's signature; returns the coerced values.

    Raises ValueError naming the option: unknown ones list what `name` accepts.
    """
    options = model_options(name)
    out = {}
    for key, value in (kwargs or {}).items():
        if key not in options:
            raise ValueError(f"unknown option {key!r} for {name}; options: {', '.join(options) or 'none'}")
        try:
            out[key] = TypeAdapter(options[key][0]).validate_python(value)
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(f"{key}={value!r} for {name}: {first['msg']}") from None
    return out


def target_layer(model: nn.Module, name: str) -> nn.Module:
    """The registered Grad-CAM target layer of a model built by `create_model(name, ...)`."""
    return model.get_submodule(model_spec(name).target_layer)


def create_model(name: str, num_classes: int, weights: str | Path | None = None, image_size: int | None = None,
                 labels: Sequence[str] | None = None, **kwargs) -> nn.Module:
    """Build a registered model with random init, or load a local weights file into it.

    `image_size` matters only to models with a fixed token grid (ViT, MLP-Mixer); CNNs ignore it.
    `kwargs` are the builder's options (e.g. `pool="max", head="bn_mlp"`), validated first.
    `labels` (the outputs' names, in order) let weights whose head names its outputs (torchxrayvision)
    keep the rows of the labels both share.
    """
    spec = model_spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} label names for {num_classes} outputs")
    options = validate_kwargs(name, kwargs)
    state = read_state_dict(weights) if weights is not None else None  # an unusable file fails before the build
    model = spec.builder(num_classes=num_classes, image_size=image_size, **options)
    if weights is not None:
        load_pretrained(model, weights, spec, labels, state=state)
    # NHWC: oneDNN's convolutions run 1.3-1.7x faster on CPU (measured: TinyVGG training 148 -> 240 img/s)
    return model.to(memory_format=torch.channels_last)


_loaded = False


def _ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from pipeline.models import zoo  # noqa: F401  (registers the built-in models)
