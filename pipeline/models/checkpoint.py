"""Checkpoints: safetensors weights with their metadata in the same file; loading never unpickles.

Metadata (arch, its builder options `model_kwargs`, labels, image size, normalisation, cycle, parent,
data hash, thresholds, trainable share...) travels inside the safetensors header, so a checkpoint is
self-describing and `load_model` rebuilds the same head; `<name>.json` beside it is a
human-readable copy. Both are written atomically.

The header also holds a SHA-256 of the metadata and every tensor (name, dtype, shape, bytes), checked
on every load: a flipped bit anywhere in the file, a truncated file or edited metadata is a
`CheckpointError` naming the file, never a silently different model. (Files written before the
checksum existed load without the check.)
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from torch import nn

from pipeline.config import Params, Paths
from pipeline.io import atomic_path, write_json
from pipeline.models.registry import create_model

META_KEY = "cxr_meta"
DIGEST_KEY = "cxr_sha256"      # of the metadata and the tensors (tensors_sha256), in the header
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated, tampered, or for another model); the
    message names the file. A ValueError, so a stage reports it in one line (stages/common.py)."""


def tensors_sha256(tensors: dict[str, torch.Tensor], meta_json: str = "") -> str:
    """SHA-256 of a metadata string and tensors (sorted by name; each name, dtype, shape and bytes)."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors + JSON metadata (+ their checksum) as one safetensors file; the same
    tensors and metadata give the same bytes in every process."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: meta_json, DIGEST_KEY: tensors_sha256(tensors, meta_json)})
        sort_header_metadata(tmp)


def sort_header_metadata(path: str | Path) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted.

    safetensors (0.8) writes the metadata map in a random order per process (safetensors#584), so two
    runs saving identical checkpoints wrote different bytes, and `dvc repro` different hashes. Sorting
    is what upstream's fix does; only the entries' order changes, so the header keeps its length and
    the tensors their offsets. A header this code would not re-serialise byte for byte is left as is.
    """
    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(size)
        header = json.loads(raw)
        meta = header.get("__metadata__") or {}
        if list(meta) == sorted(meta):
            return
        compact = dict(separators=(",", ":"), ensure_ascii=False)
        if json.dumps(header, **compact).encode() != raw.rstrip(b" "):
            return
        fixed = json.dumps({**header, "__metadata__": dict(sorted(meta.items()))}, **compact).encode()
        fh.seek(8)
        fh.write(fixed.ljust(size, b" "))


def _header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    return _parse_meta(path, _header(path).get(META_KEY))


def _parse_meta(path: Path, raw: str | None) -> dict:
    if raw is None:
        raise CheckpointError(f"checkpoint {path} has no {META_KEY} metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata ({META_KEY} is not JSON)") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has corrupt metadata ({META_KEY} is not a JSON object)")
    return meta


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint, its checksum verified; never unpickles."""
    path = Path(path)
    header = _header(path)
    meta = _parse_meta(path, header.get(META_KEY))
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from None
    digest = header.get(DIGEST_KEY)
    if digest is not None and tensors_sha256(tensors, header[META_KEY]) != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt or tampered: its contents do not match "
                              "the checksum in its header")
    return tensors, meta


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
    arch, labels, kwargs = meta.get("arch"), meta.get("labels"), meta.get("model_kwargs") or {}
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"checkpoint {path} names no architecture (metadata 'arch')")
    if not isinstance(labels, list) or not labels or not all(isinstance(lab, str) for lab in labels):
        raise CheckpointError(f"checkpoint {path} has no label list (metadata 'labels')")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"checkpoint {path} has malformed metadata 'model_kwargs'")
    try:
        model = create_model(arch, num_classes=len(labels), image_size=meta.get("image_size"), **kwargs)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be rebuilt: {err}") from None
    load_state(model, state, path, arch)
    return model.to(device).eval(), meta


def load_state(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load `state` into `module` exactly (the same keys, the same shapes), else a CheckpointError
    naming the file and a few of the differences."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state
                if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        raise CheckpointError(f"checkpoint {path} does not match {what}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {reshaped[:5]}")
    module.load_state_dict(state)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cycle_models(params: Params, paths: Paths, cycles: list[dict], device) -> tuple[dict[str, nn.Module], str]:
    """Every evaluated cycle's model ({"c0": ..., ...}) and the architecture, each checked to be the
    checkpoint its cycle evaluated (sha256 in scores.json) with cycle 0's labels."""
    tp, labels = params.train, cycles[0]["labels"]
    models, arch = {}, None
    for c in cycles:
        k = c["cycle"]
        weights = paths.model(k) / MODEL_FILE
        if file_sha256(weights) != c["model"]["sha256"]:
            raise ValueError(f"{paths.model(k)} is not the checkpoint cycle {k} evaluated; re-run evaluate@c{k}")
        model, meta = load_model(paths.model(k), device)
        if meta["labels"] != labels:
            raise ValueError(f"cycle {k}: labels {meta['labels']} differ from cycle 0's {labels}")
        models[f"c{k}"], arch = model, meta["arch"]
        if k == 0 and (meta["arch"] != tp.arch or meta.get("model_kwargs", {}) != tp.model_kwargs):
            raise ValueError(f"{paths.model(0)} is a {meta['arch']} {meta.get('model_kwargs', {})}, params say "
                             f"{tp.arch} {tp.model_kwargs}; re-run train_baseline first")
    return models, arch
