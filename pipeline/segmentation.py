"""Anatomy segmentation: an smp U-Net (random init, no download) for lungs and heart.

Two sigmoid channels (lungs, heart) because the heart overlaps the medial lungs on a frontal film.
The net learns from films and masks fitted at `segment.size` (not upsampled from the prepared size),
with light augmentation (small affine, brightness/contrast; seeded by `segment.seed`). Its
probabilities are upsampled before thresholding: to the prepared image size for the mask store, and
to the mask dataset's own resolution (1024 px for JSRT/SCR) for the held-out Dice, so the figure says
how well the anatomy is resolved, not how well a coarse grid is.
Every predicted mask is cleaned and checked for plausibility (pipeline/anatomy_checks.py).

Training and prediction run on `compute.device` under `compute.precision` (pipeline/compute.py):
forward passes under autocast, the losses and the sigmoid in float32, fp16 with a GradScaler.
Augmentation stays on the CPU (albumentations), and masks come back to the CPU before they are
stored; with cpu/fp32 every op is the one it was before the compute section existed.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import albumentations as A
import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.anatomy_checks import Check, clean_and_check
from pipeline.compute import CPU, Compute, grad_scaler, optimiser_step, task_compute
from pipeline.config import ComputeParams, Params, SegmentParams
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


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    """Area averaging when shrinking (nothing aliases), bilinear when enlarging (nothing blocky)."""
    if t.shape[-1] == size:
        return t
    if t.shape[-1] > size:
        return F.interpolate(t, size=(size, size), mode="area")
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)


def _inputs(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
    return _resize(x, size).contiguous(memory_format=torch.channels_last)


def _targets(masks: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.stack([(masks & LUNGS_BIT) > 0, (masks & HEART_BIT) > 0], 1).astype(np.float32))
    return _resize(t, size)


UNKNOWN = -1.0  # target value of a structure an image's mask dataset does not draw (smp's ignore_index)


def partial_targets(masks: np.ndarray, known: np.ndarray, size: int) -> torch.Tensor:
    """(N, 2, size, size) targets; a structure the dataset does not annotate (Montgomery and Shenzhen
    draw lungs only) is UNKNOWN, so a missing heart is "not drawn", never "absent"."""
    t = _targets(masks, size)
    t[~torch.from_numpy(np.asarray(known, dtype=bool))] = UNKNOWN
    return t


# augmentation: a film a few degrees, percent and shades away from a training film is still that film
AUG_ROTATE_DEG, AUG_SCALE, AUG_SHIFT, AUG_BRIGHTNESS_CONTRAST, AUG_P = 7.0, 0.08, 0.05, 0.15, 0.8


def augmenter(p: SegmentParams) -> A.Compose | None:
    """Small affine (masks follow, nearest neighbour; black beyond the film) and brightness/contrast;
    deterministic given segment.seed. None when `segment.augment` is off."""
    if not p.augment:
        return None
    return A.Compose([
        A.Affine(rotate=(-AUG_ROTATE_DEG, AUG_ROTATE_DEG), scale=(1 - AUG_SCALE, 1 + AUG_SCALE),
                 translate_percent=(-AUG_SHIFT, AUG_SHIFT), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0,
                 p=AUG_P),
        A.RandomBrightnessContrast(AUG_BRIGHTNESS_CONTRAST, AUG_BRIGHTNESS_CONTRAST, p=AUG_P),
    ], seed=p.seed)


def augment_batch(aug: A.Compose, x: torch.Tensor, y: torch.Tensor, known: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented draw of a batch (x: (n, 1, S, S) in [0, 1]; y: (n, 2, S, S) targets); a structure
    the film's dataset does not draw stays UNKNOWN everywhere, even where the affine filled the border."""
    xs, ys = [], []
    for img, t in zip(x[:, 0].numpy(), y.numpy()):
        out = aug(image=img, mask=np.ascontiguousarray(t.transpose(1, 2, 0)))
        xs.append(np.clip(out["image"], 0, 1))
        ys.append(out["mask"].transpose(2, 0, 1))
    xb = torch.from_numpy(np.stack(xs)).unsqueeze(1).contiguous(memory_format=torch.channels_last)
    yb = torch.from_numpy(np.ascontiguousarray(np.stack(ys)))
    yb[~known] = UNKNOWN
    return xb, yb


def train_unet(p: SegmentParams, images: np.ndarray, masks: np.ndarray, known: np.ndarray,
               compute: Compute = CPU) -> torch.nn.Module:
    """Train on uint8 images (N, S, S) and bit masks at p.size; `known` (N, 2) bool per structure.
    Returns the net in eval mode, on `compute.device`. The weights are initialised on the CPU (the
    same start on every device); batches are drawn and augmented on the CPU, then moved."""
    torch.manual_seed(p.seed)
    net = build_unet(p.encoder).to(compute.device)
    x_all, y_all = _inputs(images, p.size), partial_targets(masks, known, p.size)
    known_all = torch.from_numpy(np.asarray(known, dtype=bool))
    aug = augmenter(p)
    dice = smp.losses.DiceLoss(mode="multilabel", from_logits=True, ignore_index=UNKNOWN)
    bce = smp.losses.SoftBCEWithLogitsLoss(ignore_index=UNKNOWN)
    n = len(x_all)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=1e-4)
    steps = p.epochs * max(1, -(-n // p.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps)
    scaler = grad_scaler(compute.device, compute.precision)  # fp16 only: small gradients would underflow
    gen = torch.Generator().manual_seed(p.seed)
    start_time = time.monotonic()
    for epoch in range(p.epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in tqdm(range(0, n, p.batch_size), desc=f"unet epoch {epoch + 1}/{p.epochs}", unit="batch",
                          leave=False, mininterval=5):
            b = order[start:start + p.batch_size]
            xb, yb = augment_batch(aug, x_all[b], y_all[b], known_all[b]) if aug else (x_all[b], y_all[b])
            xb, yb = xb.to(compute.device, non_blocking=True), yb.to(compute.device, non_blocking=True)
            with compute.autocast():
                logits = net(xb)
            logits = logits.float()  # the losses in fp32 (a no-op in fp32)
            loss = bce(logits, yb) + dice(logits, yb)
            optimiser_step(loss, opt, scaler)
            sched.step()
            total += float(loss.detach()) * len(b)
        log.info("unet epoch %d/%d loss %.4f (%.0f s)", epoch + 1, p.epochs, total / n, time.monotonic() - start_time)
    return net.eval()


@torch.no_grad()
def probabilities(net: torch.nn.Module, images: np.ndarray, size: int, out_size: int,
                  compute: Compute = CPU) -> torch.Tensor:
    """(N, 2, out_size, out_size) float32 lungs/heart probabilities on the CPU: the net (on
    `compute.device`) at `size` under autocast, sigmoid in fp32, upsampled bilinearly on the device."""
    net.eval()
    with compute.autocast():
        logits = net(_inputs(images, size).to(compute.device, non_blocking=True))
    probs = torch.sigmoid(logits.float())
    return F.interpolate(probs, size=(out_size, out_size), mode="bilinear", align_corners=False).cpu()


def predict_masks(net: torch.nn.Module, images: np.ndarray, size: int, out_size: int,
                  compute: Compute = CPU) -> np.ndarray:
    """uint8 bit masks (N, out_size, out_size): LUNGS_BIT | HEART_BIT where probability > 0.5."""
    probs = probabilities(net, images, size, out_size, compute).numpy()
    return ((probs[:, 0] > 0.5) * LUNGS_BIT | (probs[:, 1] > 0.5) * HEART_BIT).astype(np.uint8)


@torch.no_grad()
def predict_shard(unet_path: str, images_root: str, rows: slice, batch_size: int = 128,
                  compute: ComputeParams | None = None) -> tuple[np.ndarray, list[Check]]:
    """Cleaned masks of the images `rows` of a store, by the saved U-Net (loaded once per worker
    process, onto the device `compute` resolves to there), and each one's plausibility check."""
    c = task_compute(compute)
    net, meta = cached(("unet", *file_key(unet_path), str(c.device)), lambda: load_unet(unet_path, c.device))
    images = ArrayStore(images_root)
    idx = np.arange(images.count)[rows]
    raw = np.concatenate([predict_masks(net, batch, meta["size"], images.item_shape[-1], c)
                          for _, batch in images.iter_batches(batch_size, idx)])
    return clean_and_check(raw)


def predict_store(engine: Engine, unet_path, images: ArrayStore, out_dir, shard_size: int,
                  compute: ComputeParams | None = None) -> tuple[ArrayStore, list[Check]]:
    """Predict, clean and check a mask for every image of a store; each shard of the output is one
    task (`compute`, the params section, travels with it and is resolved in the task). Returns the
    store and one check per row."""
    tasks = ((str(unet_path), str(images.root.resolve()), s, 128, compute)
             for s in shard_slices(len(images), shard_size))
    checks: list[Check] = []

    def masks_of(results):
        for masks, shard_checks in results:
            checks.extend(shard_checks)
            yield masks

    store = write_store(out_dir, masks_of(engine.map(predict_shard, tasks)), np.uint8, shard_size,
                        attrs={"bits": {"lungs": LUNGS_BIT, "heart": HEART_BIT}}, progress="masks",
                        total=len(images))
    return store, checks


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


def evaluate_native(net: torch.nn.Module, held: "MaskSet", size: int, compute: Compute = CPU) -> dict:
    """Dice and IoU of the raw U-Net masks at each film's native mask resolution (probabilities
    upsampled to it, compared with the native masks fitted like the film), one film at a time;
    `resolution` says at which side(s)."""
    counts, sides = np.zeros((len(STRUCTURE_BITS), 4)), set()
    for i in range(len(held.images)):
        loader = held.native[i] if held.native else None
        truth = loader() if loader is not None else held.masks[i]
        side = truth.shape[-1]
        sides.add(side)
        pred = predict_masks(net, held.images[i:i + 1], size, side, compute)
        counts += mask_counts(pred, truth[None], held.known[i:i + 1])
    scores = scores_from_counts(counts, len(held.images))
    scores["resolution"] = next(iter(sides)) if len(sides) == 1 else sorted(sides)
    return scores


def save_unet(path, net: torch.nn.Module, p: SegmentParams) -> None:
    save_tensors(path, net.state_dict(), {"arch": "smp.Unet", "encoder": p.encoder, "size": p.size,
                                          "structures": list(STRUCTURES)})


def load_unet(path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The saved U-Net (in eval mode, on `device`); a CheckpointError naming the file when it is
    corrupt or not this U-Net."""
    state, meta = load_tensors(path)
    encoder, size = meta.get("encoder"), meta.get("size")
    if meta.get("arch") != "smp.Unet" or not isinstance(encoder, str) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"checkpoint {path} is not a U-Net checkpoint (metadata arch, encoder, size)")
    try:
        net = build_unet(encoder)
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"checkpoint {path} names an unknown U-Net encoder {encoder[:64]!r}") from None
    load_state(net, state, path, f"smp.Unet({encoder})")
    return net.to(device).eval(), meta


@dataclass
class MaskSet:
    images: np.ndarray          # uint8 (N, S, S)
    masks: np.ndarray           # uint8 bit masks (N, S, S)
    known: np.ndarray           # bool (N, 2): lungs, heart annotated
    sources: list[str]
    native: list[Callable[[], np.ndarray] | None] = field(default_factory=list)  # MaskRecord.native


HELD_OUT = 0.15


def mask_sets(params: Params) -> tuple[MaskSet, MaskSet, list]:
    """(train, held-out, quarantined) from `segment.mask_sources`, split by patient; phantom masks stand
    in for a structure no source draws (all of them when no source is given). At most
    `segment.n_train` training images. Films and masks are fitted at `segment.size` (the data's fit
    and trim), so the U-Net sees that many pixels of the original film."""
    from pipeline.data.masks import phantom as phantom_masks

    p = params.segment
    data = params.data.model_copy(update={"image_size": p.size})
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
                       np.array([[s in r.known for s in STRUCTURES] for _, r in items], bool), [n for n, _ in items],
                       [r.native for _, r in items])

    return stack(train), stack(held), quarantined
