"""One model registry: every stage (train, CAM, evaluate, viewer) builds models the same way.

`create_model(name, num_classes)` returns a torch module with random weights unless a local weights
file is given (nothing is ever downloaded). Each entry names its Grad-CAM target layer, so CAM code
never guesses. A builder's keyword options (`train.model_kwargs`) are typed in its signature and
checked against it before anything is built, so a typo fails in `python -m pipeline.config`.
"""
from __future__ import annotations

import inspect
import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


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
        _REGISTRY[name] = ModelSpec(name, builder, target_layer, classifier, reshape, key_map)
        return builder
    return wrap


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
                 **kwargs) -> nn.Module:
    """Build a registered model with random init, or load a local weights file into it.

    `image_size` matters only to models with a fixed token grid (ViT, MLP-Mixer); CNNs ignore it.
    `kwargs` are the builder's options (e.g. `pool="max", head="bn_mlp"`), validated first.
    """
    spec = model_spec(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = spec.builder(num_classes=num_classes, image_size=image_size, **validate_kwargs(name, kwargs))
    if weights is not None:
        load_weights(model, weights, spec)
    # NHWC: oneDNN's convolutions run 1.3-1.7x faster on CPU (measured: TinyVGG training 148 -> 240 img/s)
    return model.to(memory_format=torch.channels_last)


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a local weights file: safetensors, or a torch file read without unpickling code.

    Training checkpoints are unwrapped (`state_dict`, `model_state_dict` or `model` entry) and
    DataParallel's `module.` prefix is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights {path} are not a readable safetensors file ({_first_line(err)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever the file holds, it is not a plain state dict
            raise ValueError(f"weights {path} are not a plain state dict (torch.load with "
                             f"weights_only=True refused them: {_load_failure(err)})") from None
        if isinstance(state, dict):
            for wrapper in ("state_dict", "model_state_dict", "model"):
                if isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
                    break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path.name} hold no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _load_failure(err: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, without torch's advice to load the file unsafely."""
    text = str(err).strip()
    if not text.startswith("Weights only load failed"):
        return _first_line(err)
    rest = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else \
        "\n".join(text.splitlines()[1:])
    lines = [line.strip() for line in rest.splitlines() if line.strip() and "weights_only" not in line
             and not line.strip().startswith(("Check the documentation", "Please file"))]
    why = lines[0].split(". ")[0].rstrip(".")[:200] if lines else ""
    return "the file holds objects other than tensors" + (f" ({why})" if why else "")


def load_weights(model: nn.Module, path: str | Path, spec: ModelSpec) -> None:
    """Load a local weights file into `model` (keys renamed by the spec's `key_map`).

    The head is re-initialised where it differs (another label set, another head): its keys are
    skipped. Any other missing, unexpected or differently shaped key is a ValueError listing a few.
    """
    path = Path(path)
    state = read_state_dict(path)
    if spec.key_map is not None:
        state = spec.key_map(state)
    own = model.state_dict()
    head = spec.classifier + "."

    def in_head(key: str) -> bool:
        return key.startswith(head)

    skipped = [k for k, v in state.items() if in_head(k) and (k not in own or own[k].shape != v.shape)]
    # BatchNorm counters are absent from old checkpoints; BatchNorm fills them in itself
    missing = [k for k in own if k not in state and not in_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not in_head(k)]
    reshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
                if k in own and not in_head(k) and own[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        def few(keys: list[str]) -> str:
            return f"{keys[:5]}{' ... (%d in all)' % len(keys) if len(keys) > 5 else ''}"
        raise ValueError(f"weights {path.name} do not fit {spec.name}: missing {few(missing)}, "
                         f"unexpected {few(unexpected)}, wrong shape {few(reshaped)}")
    for k in skipped:
        state.pop(k)
    model.load_state_dict(state, strict=False)
    if skipped or any(in_head(k) and k not in state for k in own):
        log.info("weights %s: head %r re-initialised (%d keys of the file skipped)", path.name, spec.classifier,
                 len(skipped))


_loaded = False


def _ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from pipeline.models import zoo  # noqa: F401  (registers the built-in models)
