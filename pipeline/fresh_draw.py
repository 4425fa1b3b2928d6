"""Score trained cycles on a fresh, larger phantom draw: is a per-label difference signal or sampling?

The run's own `test` and `test_shifted` splits hold ~400 images each, so a weak label with ~80
positives moves the mean accuracy by points from sampling alone. The phantom can draw as many new
patients as wanted from the same generator (another seed: no patient, image or noise pattern is
shared with the run), so every cycle's model is scored again, with the thresholds it ships, on a
sample several times larger. Phantom runs only; nothing in the pipeline's outputs changes.

    python -m pipeline.fresh_draw --patients 4000 --seed 1    # -> reports/fresh_draw.json
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from pipeline.config import Paths, load_params
from pipeline.data.record import materialise
from pipeline.data.sources import phantom as phantom_source
from pipeline.data.transforms import NORMALISATION, to_model_input
from pipeline.io import read_json, write_json
from pipeline.metrics.classification import classification_metrics
from pipeline.models.checkpoint import load_model

log = logging.getLogger(__name__)

SPLITS = ("test", "test_shifted")


def draw(params, patients: int, seed: int) -> dict[str, list]:
    """Records of a new phantom population, all of it in test and test_shifted (by patient)."""
    if params.data.source != "phantom":
        raise ValueError("fresh_draw needs data.source: phantom (a real dataset cannot draw new patients)")
    if seed == params.data.seed:
        raise ValueError(f"seed {seed} is the run's own data.seed: pick another for a fresh population")
    fresh = params.model_copy(update={
        "data": params.data.model_copy(update={
            "seed": seed, "split": params.data.split.model_copy(update={"val": 0.0, "test": 0.45,
                                                                        "test_shifted": 0.45})}),
        "phantom": params.phantom.model_copy(update={"n_patients": patients})})
    out: dict[str, list] = {s: [] for s in SPLITS}
    for rec in materialise(phantom_source.records(fresh)):
        if rec.split in out:
            out[rec.split].append(rec)
    return out


def score(model: torch.nn.Module, meta: dict, records: list, batch: int = 256) -> dict:
    labels = meta["labels"]
    images = np.stack([r.image for r in records])
    norm = meta.get("normalisation") or NORMALISATION
    with torch.no_grad():
        probs = np.concatenate([torch.sigmoid(model(to_model_input(images[i:i + batch], norm))).numpy()
                                for i in range(0, len(images), batch)])
    y = np.array([[r.labels.get(label, np.nan) for label in labels] for r in records], dtype=np.float64)
    m = classification_metrics(y, probs, meta["thresholds"], labels)
    return {"n": len(records), "auroc_macro": m["auroc_macro"], "accuracy": m["accuracy"],
            "per_label_accuracy": {k: v["accuracy"] for k, v in m["per_label"].items()}}


def fresh_draw(root=".", patients: int = 4000, seed: int = 1) -> dict:
    paths = Paths(root)
    params = load_params(paths.params)
    population = draw(params, patients, seed)
    cycles = [c["cycle"] for c in read_json(paths.summary)["cycles"]]
    result = {"patients": patients, "seed": seed, "images": {s: len(v) for s, v in population.items()},
              "cycles": []}
    for k in cycles:
        model, meta = load_model(paths.model(k))
        scores = {s: score(model, meta, population[s]) for s in SPLITS}
        gap = scores["test"]["accuracy"] - scores["test_shifted"]["accuracy"]
        result["cycles"].append({"cycle": k, "shortcut_gap": gap, **scores})
        log.info("cycle %d: accuracy test %.3f, test_shifted %.3f (gap %.3f) on %d + %d fresh images", k,
                 scores["test"]["accuracy"], scores["test_shifted"]["accuracy"], gap,
                 scores["test"]["n"], scores["test_shifted"]["n"])
    write_json(paths.fresh_draw, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.fresh_draw", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--patients", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1, help="any seed but the run's data.seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fresh_draw(args.root, args.patients, args.seed)


if __name__ == "__main__":
    main()
