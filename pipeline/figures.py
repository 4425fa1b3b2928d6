"""Report pictures (matplotlib, headless). Every figure is written atomically as PNG."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.cam.maps import upsample  # noqa: E402
from pipeline.io import atomic_path  # noqa: E402


def _save(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def overlay(ax, image: np.ndarray, cam: np.ndarray | None, title: str = "") -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    if cam is not None:
        ax.imshow(upsample(cam, image.shape[-1]), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def save_atlas(path, atlas: np.ndarray, hot: np.ndarray | None, keep: np.ndarray | None,
               mean_image: np.ndarray) -> None:
    """Where the previous model looked outside the labels' anatomy, pooled over the training set, and
    the regions the enhancement decorrelates first (`hot`) and keeps (`keep`, near each image's anatomy)."""
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    axes[0].imshow(mean_image, cmap="gray")
    axes[0].imshow(atlas, cmap="magma", alpha=0.6, vmin=0, vmax=1)
    axes[0].set_title("off-anatomy attention (inaccurate CAMs)", fontsize=8)
    for ax, mask, cmap, title in ((axes[1], hot, "autumn", "decorrelated first"),
                                  (axes[2], keep, "summer", "kept: accurate CAMs beyond the mask")):
        ax.imshow(mean_image, cmap="gray")
        if mask is not None and mask.any():
            ax.imshow(np.ma.masked_where(~mask, mask.astype(float)), cmap=cmap, alpha=0.6, vmin=0, vmax=1)
        else:
            title += "\n(none)"
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.axis("off")
    _save(fig, path)


def save_before_after(path, raw: np.ndarray, enhanced: np.ndarray, title: str) -> None:
    n = len(raw)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        overlay(axes[0, i], raw[i], None, "raw" if i == 0 else "")
        overlay(axes[1, i], enhanced[i], None, "enhanced" if i == 0 else "")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def save_cam_grid(path, images: np.ndarray, cams: np.ndarray, labels: list[str], truth: np.ndarray,
                  probs: np.ndarray, title: str) -> None:
    """Rows: fixed test images; columns: one heatmap per label, titled with truth and probability."""
    n, n_labels = len(images), len(labels)
    fig, axes = plt.subplots(n, n_labels, figsize=(1.7 * n_labels, 1.8 * n), squeeze=False)
    for i in range(n):
        for k, label in enumerate(labels):
            t = "?" if np.isnan(truth[i, k]) else int(truth[i, k])
            overlay(axes[i, k], images[i], cams[i, k], f"{label[:14]} y={t} p={probs[i, k]:.2f}")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def save_before_after_cams(path, images: np.ndarray, cams_first: np.ndarray, cams_last: np.ndarray,
                           truth: np.ndarray, labels: list[str], first: int, last: int) -> None:
    """For each fixed image: cycle 0's and the latest cycle's heatmap of its first positive label."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n, 3.8), squeeze=False)
    for i in range(n):
        pos = np.flatnonzero(np.nan_to_num(truth[i]) == 1)
        k = int(pos[0]) if len(pos) else 0
        overlay(axes[0, i], images[i], cams_first[i, k], f"c{first} {labels[k][:12]}")
        overlay(axes[1, i], images[i], cams_last[i, k], f"c{last} {labels[k][:12]}")
    fig.suptitle(f"where the model looks: cycle {first} (top) vs cycle {last} (bottom)", fontsize=9)
    _save(fig, path)


def save_roc(path, roc_by_cycle: dict[int, dict], split: str) -> None:
    cycles = sorted(roc_by_cycle)
    labels = list(roc_by_cycle[cycles[0]][split])
    fig, axes = plt.subplots(1, len(labels), figsize=(3 * len(labels), 3), squeeze=False)
    for k, label in enumerate(labels):
        ax = axes[0, k]
        for c in cycles:
            pts = roc_by_cycle[c][split][label]
            if pts["fpr"]:
                ax.plot(pts["fpr"], pts["tpr"], label=f"c{c}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{label} ({split})", fontsize=8)
        ax.set_xlabel("1 - specificity", fontsize=7)
        ax.set_ylabel("sensitivity", fontsize=7)
        ax.legend(fontsize=6)
    _save(fig, path)


def save_confusions(path, per_label: dict, labels: list[str], cycle: int) -> None:
    fig, axes = plt.subplots(1, len(labels), figsize=(2.4 * len(labels), 2.4), squeeze=False)
    for k, label in enumerate(labels):
        cm = np.asarray(per_label[label]["test_confusion"])
        ax = axes[0, k]
        ax.imshow(cm, cmap="Blues")
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
        ax.set_xticks([0, 1], ["pred 0", "pred 1"], fontsize=6)
        ax.set_yticks([0, 1], ["true 0", "true 1"], fontsize=6)
        ax.set_title(label, fontsize=8)
    fig.suptitle(f"cycle {cycle}: confusion matrices (test)", fontsize=9)
    _save(fig, path)


def save_loss_curves(path, histories: dict[int, "object"]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3))
    offset = 0
    for c in sorted(histories):
        h = histories[c]
        x = np.arange(len(h)) + offset
        ax.plot(x, h["train_loss"], label=f"c{c} train")
        ax.plot(x, h["val_loss"], "--", label=f"c{c} val")
        offset += len(h)
    ax.set_xlabel("epoch (cycles in sequence)", fontsize=8)
    ax.set_ylabel("BCE", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def save_trends(path, cycles: list[dict], keys: list[str]) -> None:
    """Every headline figure across cycles: the picture of whether the cycle worked."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = [c["cycle"] for c in cycles]
    for key in keys:
        ys = [c.get(key) for c in cycles]
        if any(y is not None for y in ys):
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=key)
    ax.set_xticks(xs)
    ax.set_xlabel("cycle", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def save_policy_comparison(path, results: dict[str, list[dict]], keys: list[str]) -> None:
    """One panel per score, one line per enhancement policy, across cycles."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for policy, cycles in results.items():
            ys = [np.nan if c.get(key) is None else c[key] for c in cycles]
            ax.plot([c["cycle"] for c in cycles], ys, marker="o", label=policy)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("cycle", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
    axes[0, 0].legend(fontsize=7)
    _save(fig, path)


def save_mask_preview(path, images: np.ndarray, masks: np.ndarray, plausible: np.ndarray, reasons: list[str],
                      title: str) -> None:
    """Predicted lungs (cyan) and heart (red) outlined over films; an implausible mask is framed in red
    with its reason. What a dataset without ground-truth masks offers instead of a Dice."""
    from pipeline.data.record import HEART_BIT, LUNGS_BIT

    n = len(images)
    if n == 0:
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, f"{title}\n(no films in this split)", ha="center", va="center", fontsize=8)
        ax.axis("off")
        _save(fig, path)
        return
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.35 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes.ravel()[i]
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        for bit, color in ((LUNGS_BIT, "cyan"), (HEART_BIT, "red")):
            m = (masks[i] & bit) > 0
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=color, linewidths=0.8)
        if not plausible[i]:
            ax.set_title("implausible:\n" + reasons[i].split(";")[0][:32], fontsize=6, color="#b00")
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("#b00")
                spine.set_linewidth(2.5)
    fig.suptitle(f"{title}; {int((~np.asarray(plausible)).sum())} implausible", fontsize=9)
    _save(fig, path)
