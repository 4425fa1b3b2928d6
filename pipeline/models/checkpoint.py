"""Checkpoints: safetensors weights with their metadata in the same file; loading never unpickles.

Metadata (arch, its builder options `model_kwargs`, labels, image size, normalisation, cycle, parent,
data hash, thresholds, trainable share...) travels inside the safetensors header, so a checkpoint is
self-describing and `load_model` rebuilds the same head; `<name>.json` beside it is a
human-readable copy. Both are written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from torch import nn

from pipeline.io import atomic_path, write_json
from pipeline.models.registry import create_model

META_KEY = "cxr_meta"
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    pass


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors + JSON metadata as one safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no {META_KEY} metadata")
    return json.loads(raw)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_meta(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None


def save_model(directory: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write `model.safetensors` (+ `model.json`) into `directory`; returns the weights path."""
    directory = Path(directory)
    path = directory / MODEL_FILE
    save_tensors(path, model.state_dict(), meta)
    meta = {**meta, "sha256": file_sha256(path)}
    write_json(directory / "model.json", meta)
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from its own metadata and load the weights; returns (model in eval, meta)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    state, meta = load_tensors(path)
    model = create_model(meta["arch"], num_classes=len(meta["labels"]), image_size=meta.get("image_size"),
                         **meta.get("model_kwargs", {}))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match {meta['arch']}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), meta


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
