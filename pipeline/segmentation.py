"""Anatomy segmentation: an smp U-Net (random init, no download) for lungs and heart.

Two sigmoid channels (lungs, heart) because the heart overlaps the medial lungs on a frontal film.
The net runs at `segment.size` (lungs and heart are large structures) and its probabilities are
upsampled to the prepared image size before thresholding.
"""
from __future__ import annotations

import logging

import numpy as np
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import SegmentParams
from pipeline.data.record import HEART_BIT, LUNGS_BIT
from pipeline.data.store import ArrayStore, ArrayStoreWriter
from pipeline.models.checkpoint import load_tensors, save_tensors

log = logging.getLogger(__name__)
STRUCTURES = ("lungs", "heart")


def build_unet(encoder: str) -> torch.nn.Module:
    return smp.Unet(encoder_name=encoder, encoder_weights=None, encoder_depth=4,
                    decoder_channels=(128, 64, 32, 16), in_channels=1, classes=len(STRUCTURES))


def _inputs(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] != size else x


def _targets(masks: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.stack([(masks & LUNGS_BIT) > 0, (masks & HEART_BIT) > 0], 1).astype(np.float32))
    return F.interpolate(t, size=(size, size), mode="area") if t.shape[-1] != size else t


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool arrays over all their pixels."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = float(np.logical_or(pred, truth).sum())
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def train_unet(p: SegmentParams, images: ArrayStore, masks: ArrayStore, train_idx: np.ndarray) -> torch.nn.Module:
    """Train on (image, mask) pairs at p.size with BCE + Dice; returns the net in eval mode."""
    torch.manual_seed(p.seed)
    net = build_unet(p.encoder)
    x_all, y_all = _inputs(images.read(train_idx), p.size), _targets(masks.read(train_idx), p.size)
    opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=1e-4)
    steps = p.epochs * max(1, -(-len(train_idx) // p.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=steps)
    dice = smp.losses.DiceLoss(mode="multilabel", from_logits=True)
    gen = torch.Generator().manual_seed(p.seed)
    for epoch in range(p.epochs):
        net.train()
        order = torch.randperm(len(train_idx), generator=gen)
        total = 0.0
        for start in range(0, len(order), p.batch_size):
            b = order[start:start + p.batch_size]
            logits = net(x_all[b])
            loss = F.binary_cross_entropy_with_logits(logits, y_all[b]) + dice(logits, y_all[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        log.info("unet epoch %d/%d loss %.4f", epoch + 1, p.epochs, total / len(order))
    return net.eval()


@torch.no_grad()
def predict_masks(net: torch.nn.Module, images: np.ndarray, size: int, out_size: int) -> np.ndarray:
    """uint8 bit masks (N, out_size, out_size): LUNGS_BIT | HEART_BIT where probability > 0.5."""
    net.eval()
    probs = torch.sigmoid(net(_inputs(images, size)))
    probs = F.interpolate(probs, size=(out_size, out_size), mode="bilinear", align_corners=False).numpy()
    return ((probs[:, 0] > 0.5) * LUNGS_BIT | (probs[:, 1] > 0.5) * HEART_BIT).astype(np.uint8)


def predict_store(net: torch.nn.Module, images: ArrayStore, out_dir, size: int, shard_size: int,
                  batch_size: int = 128) -> ArrayStore:
    """Predict a mask for every image of a store, shard by shard."""
    out_size = images.item_shape[-1]
    writer = ArrayStoreWriter(out_dir, (out_size, out_size), np.uint8, shard_size, attrs={"bits": {"lungs": LUNGS_BIT, "heart": HEART_BIT}})
    for _, batch in tqdm(images.iter_batches(batch_size), total=-(-len(images) // batch_size),
                         desc="segment", unit="batch", mininterval=5):
        writer.append(predict_masks(net, batch, size, out_size))
    return writer.close()


def evaluate_masks(pred: ArrayStore, truth: ArrayStore, idx: np.ndarray) -> dict:
    """Dice and IoU per structure on the given (held-out) images."""
    p, t = pred.read(idx), truth.read(idx)
    out = {}
    for name, bit in (("lungs", LUNGS_BIT), ("heart", HEART_BIT)):
        d, i = dice_iou((p & bit) > 0, (t & bit) > 0)
        out[name] = {"dice": round(d, 4), "iou": round(i, 4)}
    out["n_images"] = int(len(idx))
    return out


def save_unet(path, net: torch.nn.Module, p: SegmentParams) -> None:
    save_tensors(path, net.state_dict(), {"arch": "smp.Unet", "encoder": p.encoder, "size": p.size,
                                          "structures": list(STRUCTURES)})


def load_unet(path) -> tuple[torch.nn.Module, dict]:
    state, meta = load_tensors(path)
    net = build_unet(meta["encoder"])
    net.load_state_dict(state)
    return net.eval(), meta
