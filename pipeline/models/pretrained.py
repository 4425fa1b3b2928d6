"""Pretrained weights from a local file (`train.weights`), whatever library wrote them; never downloaded.

One loader for every layout, recognised from the tensors themselves (names and shapes), not from the
file name:

- torchxrayvision DenseNet-121 (`xrv.models.DenseNet(weights="densenet121-res224-all")`, its
  `state_dict()` saved): a 1-channel first convolution, 18 named pathologies, input in [-1024, 1024];
- torchvision state dicts (ImageNet or CheXNet-style checkpoints), whose 1000-class head is dropped;
- timm state dicts (`model.safetensors` from timm / the Hub) for the models the zoo builds with timm.

The backbone must fit exactly; the first convolution is adapted between 1 and 3 input channels; the
head keeps the rows of the labels the file's head names too (the rest stay as the registry initialised
them). The model's input conversion (`input_norm`, pipeline/models/inputs.py) must be the one the weights
were trained on where the file says so: it is a builder option, so the checkpoint records it.

Files are read without unpickling code: safetensors, or `torch.load(weights_only=True)`. A whole
pickled model (torchxrayvision's downloads are) is refused with how to turn it into a state dict.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from pipeline.models.inputs import adapt_channels, first_conv, input_options

if TYPE_CHECKING:
    from pipeline.models.registry import ModelSpec

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# torchxrayvision's DenseNet outputs, in order (xrv.datasets.default_pathologies)
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
# one name per finding across label sets (after case, spaces and underscores are folded)
LABEL_ALIASES = {"pleural effusion": "effusion", "infiltrate": "infiltration"}

# (layout, keys a state dict of that kind always has): names the file in messages only; fitting decides
_SIGNATURES = (
    ("torchvision DenseNet", ("features.conv0.weight", "features.denseblock1.denselayer1.conv1.weight")),
    ("torchvision/timm ResNet", ("conv1.weight", "layer1.0.conv1.weight")),
    ("torchvision EfficientNet", ("features.0.0.weight", "features.1.0.block.0.0.weight")),
    ("torchvision ViT", ("conv_proj.weight", "encoder.layers.encoder_layer_0.ln_1.weight")),
    ("torchvision VGG", ("features.0.weight", "features.2.weight")),
    ("timm EfficientNet", ("conv_stem.weight", "blocks.0.0.conv_dw.weight")),
    ("timm ViT", ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")),
    ("timm MLP-Mixer", ("stem.proj.weight", "blocks.0.mlp_tokens.fc1.weight")),
    ("TinyVGG", ("features.0.0.weight", "features.1.0.weight")),
)


@dataclass(frozen=True)
class Layout:
    """What a weights file is, as far as its tensors (and a timm config.json beside it) tell."""
    name: str
    input_norm: str | None = None                # the input it was trained on; None = the file does not say
    labels: tuple[str, ...] | None = None        # its head's outputs by name, where known


def identify(state: StateDict, path: Path | None = None) -> Layout | None:
    """The layout of a (key-mapped) state dict, or None when it is none this module knows."""
    conv0, head = state.get("features.conv0.weight"), state.get("classifier.weight")
    if conv0 is not None and conv0.ndim == 4 and conv0.shape[1] == 1:
        # a 1-channel DenseNet-121 is torchxrayvision's (its 18 outputs are named)
        named = head is not None and head.shape[0] == len(XRV_PATHOLOGIES)
        return Layout("torchxrayvision DenseNet-121", "xrv", XRV_PATHOLOGIES if named else None)
    for name, keys in _SIGNATURES:
        if all(k in state for k in keys):
            norm, labels = _timm_config(path, name) if name.startswith("timm") else (None, None)
            return Layout(name, norm, labels)
    return None


def _timm_config(path: Path | None, layout: str) -> tuple[str | None, tuple[str, ...] | None]:
    """(input_norm, label names) from the timm/Hub `config.json` beside a weights file, if there is one."""
    from pipeline.models.inputs import INPUT_NORMS

    cfg_path = path.parent / "config.json" if path is not None else None
    if cfg_path is None or not cfg_path.is_file():
        return None, None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        log.warning("%s: not JSON; the weights' normalisation is unknown", cfg_path)
        return None, None
    if not isinstance(cfg, dict) or "architecture" not in cfg:   # not a timm config
        return None, None
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else cfg
    mean, std = pre.get("mean"), pre.get("std")
    norm = None
    if mean is not None and std is not None:
        for name, stats in INPUT_NORMS.items():
            if stats and name != "xrv" and _close(stats, (mean, std)):
                norm = name
        if norm is None:
            log.warning("%s: mean %s std %s match no input_norm option (%s)", cfg_path, mean, std,
                        ", ".join(INPUT_NORMS))
    names = cfg.get("label_names")
    labels = tuple(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None
    return norm, labels


def _close(stats, given) -> bool:
    try:
        return all(len(a) == len(b) and all(abs(x - float(y)) < 1e-3 for x, y in zip(a, b))
                   for a, b in zip(stats, given))
    except (TypeError, ValueError):
        return False


def label_key(name: str) -> str:
    """A label name folded for matching across label sets: 'Pleural_Effusion' == 'pleural effusion' == 'Effusion'."""
    key = re.sub(r"[\s_\-]+", " ", name).strip().casefold()
    return LABEL_ALIASES.get(key, key)


def match_labels(ours: Sequence[str], theirs: Sequence[str]) -> list[tuple[int, int]]:
    """(our row, their row) for each of our labels that their head also has."""
    index = {label_key(t): j for j, t in enumerate(theirs) if t}
    return [(i, index[label_key(o)]) for i, o in enumerate(ours) if label_key(o) in index]


# ----- reading ------------------------------------------------------------------------------------------

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
            raise ValueError(f"weights {path} are not a plain state dict (torch.load with weights_only=True "
                             f"refused them: {_load_failure(err)})") from None
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
    """Why torch.load(weights_only=True) failed, without torch's advice to load the file unsafely;
    for pickled objects, how to get a state dict instead (torchxrayvision's .pt files are whole models)."""
    text = str(err).strip()
    if not text.startswith("Weights only load failed"):
        return _first_line(err)
    rest = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else \
        "\n".join(text.splitlines()[1:])
    lines = [line.strip() for line in rest.splitlines() if line.strip() and "weights_only" not in line
             and not line.strip().startswith(("Check the documentation", "Please file"))]
    why = lines[0].split(". ")[0].rstrip(".")[:160] if lines else ""
    return ("the file holds objects other than tensors" + (f" ({why})" if why else "")
            + "; if it is a whole pickled model, save its state dict where its code is trusted "
            "(torch.save(model.state_dict(), path)) and use that file")


# ----- loading ------------------------------------------------------------------------------------------

def _few(keys: list[str], n: int = 3) -> str:
    return f"{keys[:n]}{' ... (%d in all)' % len(keys) if len(keys) > n else ''}"


def _built_by(model: nn.Module) -> str:
    module = type(model).__module__.split(".")[0]
    return module if module in ("timm", "torchvision") else "this pipeline"


def load_pretrained(model: nn.Module, path: str | Path, spec: ModelSpec, labels: Sequence[str] | None = None,
                    state: StateDict | None = None) -> None:
    """Load a local weights file into `model` built by the registry for `spec`.

    `labels` (the model's outputs, in order) let a head whose outputs the file names keep the rows of
    shared labels; `state` is the file's `read_state_dict`, if already read. Raises ValueError naming
    the file: unreadable, a layout that does not fit the architecture (missing, unexpected or reshaped
    tensors), or an input conversion other than the weights were trained on.
    """
    path = Path(path)
    state = read_state_dict(path) if state is None else state
    if spec.key_map is not None:
        state = spec.key_map(state)
    layout = identify(state, path)
    what = layout.name if layout else "no known layout"
    own = model.state_dict()
    head = spec.classifier + "."
    conv_key = first_conv(model)[0] + ".weight"
    new, adapted = {}, None
    missing, reshaped = [], []
    for key, mine in own.items():
        if key.startswith(head):
            continue
        theirs = state.get(key)
        if theirs is None:
            if not key.endswith("num_batches_tracked"):  # absent from old checkpoints; BatchNorm fills it in
                missing.append(key)
        elif theirs.shape == mine.shape:
            new[key] = theirs
        elif key == conv_key and theirs.ndim == 4 and theirs.shape[1] in (1, 3) and \
                (theirs.shape[0], *theirs.shape[2:]) == (mine.shape[0], *mine.shape[2:]):
            new[key], adapted = adapt_channels(theirs, mine.shape[1]), theirs.shape[1]
        else:
            reshaped.append(f"{key} {tuple(theirs.shape)} != {tuple(mine.shape)}")
    unexpected = [k for k in state if k not in own and not k.startswith(head)]
    if not new and state:
        raise ValueError(f"weights {path.name} ({what}) do not fit {spec.name}, built by {_built_by(model)}: "
                         f"none of its tensors is one of the model's (expected keys like {_few(list(own), 2)}, "
                         f"the file has {_few(list(state), 2)})")
    if missing or unexpected or reshaped:
        raise ValueError(f"weights {path.name} ({what}) do not fit {spec.name}: missing {_few(missing)}, "
                         f"unexpected {_few(unexpected)}, wrong shape {_few(reshaped)}")
    _check_input(model, path, layout, spec.name)
    head_state, head_note = _head(own, state, head, layout, labels)
    new.update(head_state)
    model.load_state_dict(new, strict=False)
    log.info("weights %s (%s) loaded into %s%s; head %r: %s", path.name, what, spec.name,
             f", first convolution adapted from {adapted} to {own[conv_key].shape[1]} channels" if adapted else "",
             spec.classifier, head_note)


def _check_input(model: nn.Module, path: Path, layout: Layout | None, arch: str) -> None:
    """The model's input conversion must be the weights' where the file says which it is."""
    chans, norm = input_options(model)
    wanted = layout.input_norm if layout else None
    if wanted is not None and norm != wanted:
        extra = " (and in_chans: 1 to keep their first convolution as it is)" if wanted == "xrv" and chans != 1 else ""
        raise ValueError(f"weights {path.name} ({layout.name}) expect input_norm {wanted!r} ({_describe(wanted)}); "
                         f"{arch} has {norm!r}: set model_kwargs input_norm: {wanted}{extra}")
    if wanted is None and norm == "xrv":
        raise ValueError(f"weights {path.name} ({layout.name if layout else 'no known layout'}) are not "
                         f"torchxrayvision's; input_norm 'xrv' ([-1024, 1024] input) is for those only")


def _describe(norm: str) -> str:
    return {"xrv": "1-channel images scaled to [-1024, 1024]", "imagenet": "ImageNet mean and std per channel",
            "inception": "mean 0.5, std 0.5", "pipeline": "the pipeline's own normalisation"}[norm]


def _head(own: StateDict, state: StateDict, head: str, layout: Layout | None,
          labels: Sequence[str] | None) -> tuple[StateDict, str]:
    """The head tensors to load, and what happened to the head (for the log)."""
    mine = {k: v for k, v in own.items() if k.startswith(head)}
    theirs = {k: v for k, v in state.items() if k.startswith(head)}
    named = layout.labels if layout else None
    if named:
        if labels is None:
            log.warning("weights %s name their %d outputs, but no label names were given to map them: "
                        "the head starts from scratch", layout.name, len(named))
            return {}, "initialised (no label names to map)"
        pairs = match_labels(labels, named)
        out = {}
        for key, value in mine.items():
            src = theirs.get(key)
            if src is not None and src.shape[0] == len(named) and src.shape[1:] == value.shape[1:] \
                    and value.shape[0] == len(labels):
                rows = value.clone()
                for i, j in pairs:
                    rows[i] = src[j]
                out[key] = rows
        if not pairs or not out:
            return {}, "initialised (no shared labels)" if not pairs else "initialised (its layout differs)"
        kept = ", ".join(f"{labels[i]}<-{named[j]}" for i, j in pairs)
        return out, f"rows of {len(pairs)}/{len(labels)} labels kept ({kept}), the rest initialised"
    needed = [k for k in mine if not k.endswith("num_batches_tracked")]
    if theirs and all(k in theirs and theirs[k].shape == mine[k].shape for k in needed):
        return {k: theirs[k] for k in mine if k in theirs}, "loaded as it is (the same shape; its outputs are unnamed)"
    return {}, "initialised" + (f" (the file's has {len(theirs)} tensors of other shapes)" if theirs else "")
