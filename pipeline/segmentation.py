"""Anatomy segmentation: an smp U-Net (random init, no download) for lungs and heart.

Two sigmoid channels (lungs, heart) because the heart overlaps the medial lungs on a frontal film.
The net runs at `segment.size` (lungs and heart are large structures) and its probabilities are
upsampled to the prepared image size before thresholding.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from pipeline.config import Params, SegmentParams
from pipeline.data.manifest import patient_split
from pipeline.data.record import HEART_BIT, LUNGS_BIT, Quarantined
from pipeline.data.store import ArrayStore, write_store
from pipeline.engine import Engine, cached, file_key, shard_slices
from pipeline.models.checkpoint import CheckpointError, load_state, load_tensors, save_tensors

log = logging.getLogger(__name__)
STRUCTURES = ("lungs", "heart")


def build_unet(encoder: str) -> torch.nn.Module:
    net = smp.Unet(encoder_name=encoder, encoder_weights=None, encoder_depth=4,
                   decoder_channels=(128, 64, 32, 16), in_channels=1, classes=len(STRUCTURES))
    return net.to(memory_format=torch.channels_last)  # faster on CPU, as for the classifiers


def _inputs(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] != size else x
    return x.contiguous(memory_format=torch.channels_last)


def _targets(masks: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.stack([(masks & LUNGS_BIT) > 0, (masks & HEART_BIT) > 0], 1).astype(np.float32))
    return F.interpolate(t, size=(size, size), mode="area") if t.shape[-1] != size else t


UNKNOWN = -1.0  # target value of a structure an image's mask dataset does not draw (smp's ignore_index)


def partial_targets(masks: np.ndarray, known: np.ndarray, size: int) -> torch.Tensor:
    """(N, 2, size, size) targets; a structure the dataset does not annotate (Montgomery and Shenzhen
    draw lungs only) is UNKNOWN, so a missing heart is "not drawn", never "absent"."""
    t = _targets(masks, size)
    t[~torch.from_numpy(np.asarray(known, dtype=bool))] = UNKNOWN
    return t


def train_unet(p: SegmentParams, images: np.ndarray, masks: np.ndarray, known: np.ndarray) -> torch.nn.Module:
    """Train on uint8 images (N, S, S) and bit masks at p.size; `known` (N, 2) bool per structure.
    Returns the net in eval mode."""
    torch.manual_seed(p.seed)
    net = build_unet(p.encoder)
    x_all, y_all = _inputs(images, p.size), partial_targets(masks, known, p.size)
    dice = smp.losses.DiceLoss(mode="multilabel", from_logits=True, ignore_index=UNKNOWN)
    bce = smp.losses.SoftBCEWithLogitsLoss(ignore_index=UNKNOWN)
    n = len(x_all)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=1e-4)
    steps = p.epochs * max(1, -(-n // p.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(p.seed)
    for epoch in range(p.epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, p.batch_size):
            b = order[start:start + p.batch_size]
            logits = net(x_all[b])
            loss = bce(logits, y_all[b]) + dice(logits, y_all[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        log.info("unet epoch %d/%d loss %.4f", epoch + 1, p.epochs, total / n)
    return net.eval()


@torch.no_grad()
def predict_masks(net: torch.nn.Module, images: np.ndarray, size: int, out_size: int) -> np.ndarray:
    """uint8 bit masks (N, out_size, out_size): LUNGS_BIT | HEART_BIT where probability > 0.5."""
    net.eval()
    probs = torch.sigmoid(net(_inputs(images, size)))
    probs = F.interpolate(probs, size=(out_size, out_size), mode="bilinear", align_corners=False).numpy()
    return ((probs[:, 0] > 0.5) * LUNGS_BIT | (probs[:, 1] > 0.5) * HEART_BIT).astype(np.uint8)


@torch.no_grad()
def predict_shard(unet_path: str, images_root: str, rows: slice, batch_size: int = 128) -> np.ndarray:
    """Masks of the images `rows` of a store, by the saved U-Net (loaded once per worker process)."""
    net, meta = cached(("unet", *file_key(unet_path)), lambda: load_unet(unet_path))
    images = ArrayStore(images_root)
    idx = np.arange(images.count)[rows]
    return np.concatenate([predict_masks(net, batch, meta["size"], images.item_shape[-1])
                           for _, batch in images.iter_batches(batch_size, idx)])


def predict_store(engine: Engine, unet_path, images: ArrayStore, out_dir, shard_size: int) -> ArrayStore:
    """Predict a mask for every image of a store; each shard of the output is one task."""
    tasks = ((str(unet_path), str(images.root.resolve()), s) for s in shard_slices(len(images), shard_size))
    return write_store(out_dir, engine.map(predict_shard, tasks), np.uint8, shard_size,
                       attrs={"bits": {"lungs": LUNGS_BIT, "heart": HEART_BIT}})


STRUCTURE_BITS = (("lungs", LUNGS_BIT), ("heart", HEART_BIT))


def mask_counts(pred: np.ndarray, truth: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Per structure: (intersection, |pred| + |truth|, union, images annotating it): sums, so a
    whole store can be scored a batch at a time."""
    out = np.zeros((len(STRUCTURE_BITS), 4))
    for k, (_, bit) in enumerate(STRUCTURE_BITS):
        sel = np.asarray(known)[:, k]
        p, t = (pred[sel] & bit) > 0, (truth[sel] & bit) > 0
        out[k] = (np.logical_and(p, t).sum(), p.sum() + t.sum(), np.logical_or(p, t).sum(), sel.sum())
    return out


def scores_from_counts(counts: np.ndarray, n_images: int) -> dict:
    """Dice and IoU per structure over the images that annotate it (None where none does)."""
    out = {}
    for (name, _), (inter, total, union, n) in zip(STRUCTURE_BITS, counts):
        if not n:
            out[name] = {"dice": None, "iou": None, "n_images": 0}
            continue
        dice, iou = (2 * inter / total if total else 1.0), (inter / union if union else 1.0)
        out[name] = {"dice": round(float(dice), 4), "iou": round(float(iou), 4), "n_images": int(n)}
    out["n_images"] = int(n_images)
    return out


def evaluate_masks(pred: np.ndarray, truth: np.ndarray, known: np.ndarray) -> dict:
    """Dice and IoU per structure (pooled over pixels) of in-memory masks."""
    return scores_from_counts(mask_counts(pred, truth, known), len(pred))


def evaluate_stores(pred: ArrayStore, truth: ArrayStore, rows: np.ndarray, batch_size: int = 512) -> dict:
    """`evaluate_masks` over `rows` of two stores, a batch at a time (memory independent of len(rows))."""
    counts = np.zeros((len(STRUCTURE_BITS), 4))
    for idx, p in pred.iter_batches(batch_size, rows):
        counts += mask_counts(p, truth.read(idx), np.ones((len(idx), 2), bool))
    return scores_from_counts(counts, len(rows))


def save_unet(path, net: torch.nn.Module, p: SegmentParams) -> None:
    save_tensors(path, net.state_dict(), {"arch": "smp.Unet", "encoder": p.encoder, "size": p.size,
                                          "structures": list(STRUCTURES)})


def load_unet(path) -> tuple[torch.nn.Module, dict]:
    """The saved U-Net; a CheckpointError naming the file when it is corrupt or not this U-Net."""
    state, meta = load_tensors(path)
    encoder, size = meta.get("encoder"), meta.get("size")
    if meta.get("arch") != "smp.Unet" or not isinstance(encoder, str) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"checkpoint {path} is not a U-Net checkpoint (metadata arch, encoder, size)")
    try:
        net = build_unet(encoder)
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"checkpoint {path} names an unknown U-Net encoder {encoder[:64]!r}") from None
    load_state(net, state, path, f"smp.Unet({encoder})")
    return net.eval(), meta


@dataclass
class MaskSet:
    images: np.ndarray          # uint8 (N, S, S)
    masks: np.ndarray           # uint8 bit masks (N, S, S)
    known: np.ndarray           # bool (N, 2): lungs, heart annotated
    sources: list[str]


HELD_OUT = 0.15


def mask_sets(params: Params) -> tuple[MaskSet, MaskSet, list]:
    """(train, held-out, quarantined) from `segment.mask_sources`, split by patient; phantom masks stand
    in for a structure no source draws (all of them when no source is given). At most
    `segment.n_train` training images."""
    from pipeline.data.masks import phantom as phantom_masks

    p, data = params.segment, params.data
    records, quarantined = [], []
    for name, root in p.mask_sources.items():
        module = importlib.import_module(f"pipeline.data.masks.{name}")
        for rec in module.mask_records(root, data):
            (quarantined if isinstance(rec, Quarantined) else records).append((name, rec))
    drawn = {s for _, r in records for s in r.known}
    missing = tuple(s for s in STRUCTURES if s not in drawn)
    if missing:
        n = int(np.ceil(p.n_train / (1 - HELD_OUT))) if not records else max(32, len(records) // 3)
        log.warning("no mask dataset draws %s: using %d phantom masks for it (domain gap; see README)",
                    "/".join(missing), n)
        records += [("phantom", r) for r in phantom_masks.mask_records(n, data, p.seed, known=missing)]
    if not records:
        raise ValueError("segment.mask_sources: no image with masks found")
    held_of = patient_split([r.patient_id for _, r in records], {"val": HELD_OUT}, p.seed)
    train = [(n, r) for n, r in records if held_of[r.patient_id] == "train"][: p.n_train]
    held = [(n, r) for n, r in records if held_of[r.patient_id] == "val"]

    def stack(items) -> MaskSet:
        return MaskSet(np.stack([r.image for _, r in items]), np.stack([r.anatomy for _, r in items]),
                       np.array([[s in r.known for s in STRUCTURES] for _, r in items], bool), [n for n, _ in items])

    return stack(train), stack(held), quarantined
