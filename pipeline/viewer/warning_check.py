"""How often the viewer's shortcut warning fires on a run's test films, and whether it fires when it should.

    python -m pipeline.viewer.warning_check --root .     # after `make run`; prints JSON

Every test film of the run goes through the viewer's own analysis (`ServedModels.analyse_image`: the
served model, cycle 0 beside it, the U-Net's anatomy), and the rule of shortcut_warning.py is applied
to each positive call (probability at or above that model's threshold). Two rates answer the two
questions the warning exists for:

- `served.warned_share`: the share of the served (refined) model's positive calls that warn. A model
  that looks at the anatomy should rarely warn (the target is below 10 %);
- `cycle0.on_marker.warned_share`: among cycle 0's positive calls whose heatmap peak lies on a
  shortcut marker, the share that warn. A warning that means something fires on most of them.

"On the marker" allows for the heatmap's resolution: a Grad-CAM is computed on its layer's grid
(16 x 16 for TinyVGG at 128 px: 8 px cells) and upsampled, so its peak sits at a cell centre, and
the cells that respond to a corner marker lie inward of it, where the layer's receptive fields cover
it. On a 900-patient phantom run at the default settings, cycle 0's Pneumonia heatmaps (the label
the "R" marker agrees with) peaked 20-23 px (2.5-2.9 cells) from the marker's box, none within the
pointing game's 2 px. A peak counts as on the marker within `MARKER_REACH_CELLS` (3) cells of its
box; `on_marker_strict` reports the pointing game's own tolerance (evaluate.pointing_tolerance_px).

Markers: with the shortcut audit on, the audit's recorded boxes (Paths.audit_markers); on the
phantom, the manifest's `marker_<label>` flags say which film carries which marker and the marker is
found in its corner (`phantom_marker_box`: the "R" letter top-left, the square token top-right, both
drawn far brighter than anything else in the film's top corners). Other datasets have no markers,
and only the first rate is measured.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Paths, load_params
from pipeline.data.store import ArrayStore
from pipeline.metrics.localization import pointing_game_hit
from pipeline.viewer.inference import ServedModels
from pipeline.viewer.shortcut_warning import RULE, SHORTCUT_LIFT, warns

log = logging.getLogger(__name__)

FIXED_SHARE = 0.5         # the rule the lift replaced (a share below it warned), reported beside it
MARKER_MIN = 112          # uint8: phantom marker pixels stay above ~120 after blur; the film's top corners below ~100
MARKER_CORNERS = {"letter": "left", "token": "right"}
MARKER_REACH_CELLS = 3    # heatmap grid cells around a marker's box that count as "on the marker"
SWEEP = (0.25, 0.4, 0.5, 0.75, 1.0, 1.5)   # other lift cut-offs reported beside the rule's, to choose it on data


def phantom_marker_box(image: np.ndarray, corner: str) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the bright marker in the top-`corner` quarter of a phantom film, None if there is none."""
    side = image.shape[-1]
    q = max(2, side // 4)
    x0 = 0 if corner == "left" else side - q
    ys, xs = np.nonzero(image[:q, x0:x0 + q] >= MARKER_MIN)
    if not len(ys):
        return None
    return int(xs.min() + x0), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def marker_masks(paths: Paths, params, frame: pd.DataFrame, images: np.ndarray) -> list[np.ndarray | None]:
    """A bool mask of every marker on each film of `frame` (rows of the manifest), None where it has none."""
    side = images.shape[-1]
    boxes: list[list[tuple]] = [[] for _ in range(len(frame))]
    if params.audit.enabled and paths.audit_markers.is_file():
        markers = pd.read_parquet(paths.audit_markers).set_index("image_id")
        for k, iid in enumerate(frame["image_id"]):
            if iid in markers.index and bool(markers.at[iid, "drawn"]):
                r = markers.loc[iid]
                boxes[k].append((int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"])))
    if params.data.source == "phantom":
        from pipeline.data.phantom import SHORTCUT_MARKERS

        for label, kind in SHORTCUT_MARKERS.items():
            column = f"marker_{label}"
            if column not in frame.columns:
                continue
            for k, drawn in enumerate(frame[column].fillna(0).astype(int)):
                box = phantom_marker_box(images[k], MARKER_CORNERS[kind]) if drawn else None
                if box is not None:
                    boxes[k].append(box)
    out = []
    for film_boxes in boxes:
        if not film_boxes:
            out.append(None)
            continue
        mask = np.zeros((side, side), bool)
        for x, y, w, h in film_boxes:
            mask[y:y + h, x:x + w] = True
        out.append(mask)
    return out


def _rate(calls: list[dict], by_label: bool = False) -> dict:
    """Warn counts of positive calls, the lift's deciles 1/5/9, and what the fixed share rule did."""
    lifts = np.array([c["lift"] for c in calls], float)
    warned = [bool(warns(v)) for v in lifts]
    old = [c["share"] < FIXED_SHARE for c in calls]
    out = {"calls": len(calls), "warned": int(sum(warned)),
           "warned_share": round(float(np.mean(warned)), 4) if calls else None,
           "lift_p10_p50_p90": [round(float(q), 3) for q in np.percentile(lifts, [10, 50, 90])] if calls else None,
           f"fixed_share_{FIXED_SHARE:g}_warned_share": round(float(np.mean(old)), 4) if calls else None,
           "warned_share_if_lift_below": {f"{t:g}": round(float(np.mean(lifts < t)), 4) if calls else None
                                          for t in SWEEP}}
    if by_label:
        out["by_label"] = {label: {"calls": sum(c["label"] == label for c in calls),
                                   "warned": sum(w for c, w in zip(calls, warned) if c["label"] == label)}
                           for label in sorted({c["label"] for c in calls})}
    return out


def _summary(cycle: int, calls: list[dict]) -> dict:
    return {"cycle": cycle, **_rate(calls, by_label=True),
            "on_marker": _rate([c for c in calls if c["on_marker"]], by_label=True),
            "on_marker_strict": _rate([c for c in calls if c["on_marker_strict"]])}


def measure(root: str | Path, split: str = "test", limit: int | None = None) -> dict:
    """The warning's rates on `split`'s films of the run at `root` (see the module docstring)."""
    root = Path(root).resolve()
    base_paths = Paths(root)
    params = load_params(base_paths.params)
    paths = Paths(root, audit=params.audit.enabled)
    manifest = pd.read_parquet(paths.manifest)
    rows = np.flatnonzero(manifest["split"].to_numpy() == split)[:limit]
    frame = manifest.iloc[rows].reset_index(drop=True)
    images = ArrayStore(paths.images).read(rows)
    markers = marker_masks(paths, params, frame, images)
    models = ServedModels(root)
    models.load()
    served, base = models.latest, models.baseline
    if models.unet is None:
        raise SystemExit("error: no anatomy U-Net in this run: the warning needs it")
    base_thresholds = np.asarray(base.meta["thresholds"], float) if base is not None else None
    tolerance = params.evaluate.pointing_tolerance_px
    served_calls, base_calls, reach_px = [], [], None
    for k, image in enumerate(images):
        a = models.analyse_image(image, {"format": "prepared", "view": None, "width": image.shape[1],
                                         "height": image.shape[0]})
        for result, thresholds, calls in ((a.latest, np.asarray(a.thresholds), served_calls),
                                          (a.baseline, base_thresholds, base_calls)):
            if result is None:
                continue
            side = result.cams.shape[-1]
            reach = max(tolerance, int(round(MARKER_REACH_CELLS * side / (result.grid or side))))
            reach_px = reach if result is a.latest else reach_px
            mask = None if markers[k] is None else _fit(markers[k], result.cams.shape[1:])
            for j in np.flatnonzero(result.probabilities >= thresholds):
                if result.lifts[j] is None:
                    continue   # an empty heatmap or no anatomy: nothing to judge
                calls.append({"label": a.labels[j], "lift": result.lifts[j], "share": result.shares[j],
                              "on_marker": mask is not None and pointing_game_hit(result.cams[j], mask, reach),
                              "on_marker_strict": mask is not None and pointing_game_hit(result.cams[j], mask,
                                                                                          tolerance)})
    out = {"root": str(root), "split": split, "films": len(frame),
           "films_with_markers": int(sum(m is not None for m in markers)), "rule": RULE, "lift_below": SHORTCUT_LIFT,
           "marker_reach_px": reach_px, "pointing_tolerance_px": tolerance,
           "served": _summary(served.cycle, served_calls)}
    if base is not None:
        out["cycle0"] = _summary(base.cycle, base_calls)
    return out


def _fit(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The marker mask at the heatmap's size (the store's and the model's sizes may differ)."""
    if mask.shape == tuple(shape):
        return mask
    import cv2

    return cv2.resize(mask.astype(np.uint8), shape[::-1], interpolation=cv2.INTER_NEAREST) > 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.viewer.warning_check",
                                     description="How often the viewer's shortcut warning fires on a run's films.")
    parser.add_argument("--root", default=".", help="the project (after `make run` or `dvc repro`)")
    parser.add_argument("--split", default="test", help="the manifest split to measure (default: test)")
    parser.add_argument("--limit", type=int, default=None, help="only the split's first N films")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = measure(args.root, args.split, args.limit)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    served, base = result["served"], result.get("cycle0")
    sys.stderr.write(f"served cycle {served['cycle']}: warns on {served['warned']} of {served['calls']} positive "
                     f"calls ({_pct(served['warned_share'])}; target < 10 %)\n")
    if base is not None:
        on = base["on_marker"]
        sys.stderr.write(f"cycle {base['cycle']}: warns on {on['warned']} of {on['calls']} positive calls whose "
                         f"heatmap peak lies on a marker ({_pct(on['warned_share'])}; target: most)\n")


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


if __name__ == "__main__":
    main()
