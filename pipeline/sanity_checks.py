"""Both saliency sanity checks of the served model, after the last evaluated cycle (reports/sanity.json).

Adebayo et al.'s two checks (pipeline/metrics/sanity.py), each passing when the heatmap rank
correlation falls below SANITY_MAX:

- cascading model-parameter randomisation: already measured by every cycle's evaluation
  (`sanity_rank_corr` in reports/cycles/cK/scores.json); gathered here;
- label permutation: a twin of cycle 0 — the same architecture, init (train.seed), schedule, epochs
  and images — is trained on the training labels permuted among the images and kept as it is after
  its last epoch (it never sees a true label: the val labels it is scored on are permuted too), then
  its heatmaps on the sanity test images are compared with every evaluated cycle's. On the true val
  labels the twin's loss (`twin_val_loss`) is no lower than that of predicting each label's training
  rate (`prevalence_val_loss`): the permutation left nothing to learn. Its AUROC
  (`twin_val_auroc`) is reported beside the untrained network's (`untrained_val_auroc`): an
  untrained network's scores already rank some findings by image statistics alone (on the phantom,
  cardiomegaly — a bigger, brighter heart — at AUROC 0.10, i.e. 0.90 inverted), in either direction.

The verdict is the served model's: the cycle the stop rule serves (pipeline.cycle_control.decide, as
the report stage decides it for models/latest.json). Every model's checkpoint must still be the one
its cycle evaluated (sha256 in scores.json).

Models run on `compute.device`; probabilities under `compute.precision`, heatmaps in fp32
(pipeline/cam/all_labels.py), so the rank correlations do not move with the precision.

The twin is its own DVC stage, `sanity_twin` (models/sanity_twin, run after train_baseline): it
depends on cycle 0's recipe and the films, not on the refinement cycles, so DVC's cache, run-cache
and remotes carry it and a change to the cycles compares against the same twin. The `sanity` stage
loads it and refuses one trained for other params or films (`twin_identity`).
"""
from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.cam.all_labels import AllLabelCAM
from pipeline.compute import Compute
from pipeline.config import Params, Paths
from pipeline.cycle_control import decide, load_cycles
from pipeline.data.dataset import iterate_batches, predict
from pipeline.data.manifest import label_matrix, resolve_labels, rows
from pipeline.data.store import ArrayStore
from pipeline.metrics.classification import classification_metrics
from pipeline.metrics.sanity import SANITY_MAX, compare_with_twin, permute_labels
from pipeline.models.checkpoint import MODEL_FILE, cycle_models, load_model
from pipeline.models.freeze import apply_trainable
from pipeline.training import Rows, baseline_model, baseline_spec, run_options, start_fingerprint, train_classifier

log = logging.getLogger(__name__)


def _bce(y: np.ndarray, p: np.ndarray) -> float | None:
    """Mean binary cross-entropy over known (non-NaN) labels."""
    known = ~np.isnan(y)
    if not known.any():
        return None
    t, q = y[known], np.clip(np.asarray(p, dtype=np.float64)[known], 1e-6, 1 - 1e-6)
    return float(-(t * np.log(q) + (1 - t) * np.log(1 - q)).mean())


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _verdict(rho: float | None, cycle: int, what: str) -> tuple[bool, str | None]:
    if rho is None:
        return False, f"{what}: no informative heatmap pair at cycle {cycle}"
    if rho >= SANITY_MAX:
        return False, f"{what}: rank correlation {rho:.3f} >= {SANITY_MAX} at cycle {cycle}"
    return True, None


def cascading_summary(cycles: list[dict], serve: int) -> dict:
    """The served cycle's cascading-randomisation figure (measured by its evaluation), and every cycle's."""
    by_cycle = {f"c{c['cycle']}": c.get("sanity_rank_corr") for c in cycles}
    rho = by_cycle[f"c{serve}"]
    passed, reason = _verdict(rho, serve, "cascading randomisation")
    served = next(c for c in cycles if c["cycle"] == serve)
    steps = (served.get("sanity") or {}).get("steps", [])
    return {"cycle": serve, "final_rank_corr": rho, "passed": passed, "reason": reason, "by_cycle": by_cycle,
            "steps": len(steps)}


def run_sanity_checks(params: Params, paths: Paths, last_cycle: int | None = None) -> dict:
    """Gather cascading randomisation, run label permutation; the JSON-ready content of reports/sanity.json."""
    cycles = load_cycles(paths, params.cycle_ids(), last_cycle)
    if not cycles:
        raise ValueError("no evaluated cycle found under reports/cycles; run the evaluate stages first")
    serve = decide(cycles, params.flow).serve_cycle
    sp = params.sanity
    n_images = sp.n_images or params.evaluate.n_sanity_images
    out = {"served_cycle": serve, "max": SANITY_MAX, "cam_method": params.cam.method, "n_images": n_images,
           "cascading_randomization": cascading_summary(cycles, serve)}
    if sp.label_permutation:
        out["label_permutation"] = _label_permutation(params, paths, cycles, serve, n_images)
    else:
        out["label_permutation"] = {"cycle": serve, "rank_corr": None, "passed": None, "skipped": True,
                                    "reason": "not run: sanity.label_permutation is false"}
    checks = [out["cascading_randomization"]["passed"], out["label_permutation"]["passed"]]
    out["passed"] = all(p is not False for p in checks)
    return out


def twin_identity(params: Params, paths: Paths, labels: list[str]) -> dict:
    """Everything the twin depends on: its recipe (cycle 0's, with `sanity.epochs`), starting point,
    permutation, precision and the films. The sanity stage refuses a twin whose identity differs."""
    tp, sp = params.train, params.sanity
    data_hash = hashlib.sha256(paths.images.joinpath("index.json").read_bytes() + paths.manifest.read_bytes()
                               ).hexdigest()[:16]
    extra = {"twin": "label_permutation", "permutation_seed": sp.seed, "data": data_hash,
             **start_fingerprint(tp.arch, tp.model_kwargs, labels, tp.weights),
             "image_size": params.data.image_size, "trainable": [tp.trainable_last_n, tp.trainable_blocks]}
    spec = baseline_spec(tp, sp.epochs)
    return {"fingerprint": spec.fingerprint(extra), "extra": extra, "epochs": spec.epochs,
            "precision": params.compute.precision}


def train_twin(params: Params, paths: Paths) -> tuple[nn.Module, dict]:
    """Stage `sanity_twin`: cycle 0's recipe (pipeline.training) on the training labels permuted among the
    images, its last epoch kept; the val labels it is scored on while training are permuted too.

    Returns (twin, checkpoint metadata): besides what load_model needs, `twin` holds its AUROC and
    loss on the true val labels next to the untrained network's and the label rates' (the module
    docstring says why), and `identity` what it was trained for."""
    sp, tp = params.sanity, params.train
    compute = Compute.from_params(params.compute)
    manifest = pd.read_parquet(paths.manifest)
    labels = resolve_labels(params.data.labels, manifest)
    images = ArrayStore(paths.images)
    y = label_matrix(manifest, labels)
    train_rows, val_rows = rows(manifest, "train"), rows(manifest, "val")
    y_val = y[val_rows]
    identity = twin_identity(params, paths, labels)

    def val_scores(model) -> dict:
        """AUROC (macro, per label) and loss on the true val labels."""
        probs = predict(model.to(compute.device), images, val_rows, compute=compute)
        m = classification_metrics(y_val, probs, np.full(len(labels), 0.5), labels)
        return {"auroc": m["auroc_macro"], "loss": _bce(y_val, probs),
                "per_label": {lab: m["per_label"][lab]["auroc"] for lab in labels}}

    t0 = time.perf_counter()
    permuted = permute_labels({"train": y[train_rows], "val": y_val}, sp.seed)
    twin = baseline_model(tp, labels, params.data.image_size)
    untrained = val_scores(twin)  # the same network before training: what image statistics alone give
    apply_trainable(twin, tp.trainable_last_n, tp.trainable_blocks)
    train_classifier(twin, baseline_spec(tp, sp.epochs), labels, Rows(images, train_rows, permuted["train"]),
                     Rows(images, val_rows, permuted["val"]), paths.sanity_resume,
                     fingerprint_extra=identity["extra"], keep_last=True, **run_options(params))
    trained = val_scores(twin)
    base_loss = _bce(y_val, np.broadcast_to(np.nanmean(y[train_rows], axis=0), y_val.shape))  # label rates alone
    log.info("label-permutation twin: %d epochs in %.1f s; on the true val labels AUROC %s (untrained %s), "
             "loss %s (label rates alone %s)", identity["epochs"], time.perf_counter() - t0, _f(trained["auroc"]),
             _f(untrained["auroc"]), _f(trained["loss"]), _f(base_loss))
    info = {"twin_val_auroc": trained["auroc"], "untrained_val_auroc": untrained["auroc"],
            "twin_val_loss": trained["loss"], "prevalence_val_loss": base_loss,
            "twin_val_auroc_per_label": trained["per_label"], "untrained_val_auroc_per_label": untrained["per_label"]}
    meta = {"arch": tp.arch, "labels": labels, "model_kwargs": dict(tp.model_kwargs),
            "image_size": params.data.image_size, "twin": info, "identity": identity}
    return twin.cpu(), meta


def load_twin(params: Params, paths: Paths, labels: list[str], device) -> tuple[nn.Module, dict]:
    """The twin stage `sanity_twin` trained, if it was trained for these params, films and labels."""
    weights = paths.sanity_twin / MODEL_FILE
    if not weights.is_file():
        raise ValueError(f"{paths.sanity_twin} holds no trained twin (sanity.label_permutation was off when "
                         "it ran); run `dvc repro sanity_twin`")
    twin, meta = load_model(weights, device)
    expected = twin_identity(params, paths, labels)
    if meta.get("identity", {}).get("fingerprint") != expected["fingerprint"] or meta.get("labels") != labels:
        raise ValueError(f"{paths.sanity_twin} was trained for other params, films or labels; "
                         "run `dvc repro sanity_twin`")
    return twin, meta


def sanity_images(paths: Paths, n_images: int) -> torch.Tensor:
    """The first `n_images` test films, as the model takes them: the heatmaps are compared on these."""
    manifest = pd.read_parquet(paths.manifest)
    test_idx = rows(manifest, "test")[:n_images]
    if len(test_idx) == 0:
        raise ValueError("the manifest has no test images to compare heatmaps on")
    return next(iterate_batches(ArrayStore(paths.images), test_idx, None, len(test_idx)))[0]


def _label_permutation(params: Params, paths: Paths, cycles: list[dict], serve: int, n_images: int) -> dict:
    """Every cycle's heatmaps against the twin's; the verdict is the served cycle's."""
    device = Compute.from_params(params.compute).device
    references, arch = cycle_models(params, paths, cycles, device)
    twin, meta = load_twin(params, paths, cycles[0]["labels"], device)

    def cam_fn(model, batch):
        return AllLabelCAM(model, arch, params.cam.method)(batch)

    res = compare_with_twin(references, sanity_images(paths, n_images), cam_fn, twin, meta["twin"],
                            seed=params.sanity.seed)
    rho = res["rank_corr"][f"c{serve}"]
    passed, reason = _verdict(rho, serve, "label permutation")
    return {"cycle": serve, "rank_corr": rho, "passed": passed, "reason": reason,
            "n_maps": res["n_maps"][f"c{serve}"], "by_cycle": res["rank_corr"],
            "epochs": meta["identity"]["epochs"], "seed": params.sanity.seed, **res["twin"]}
