"""Explain one film with a trained project, from Python: every label's probability against its
threshold, the share of its heatmap inside the label's anatomy, the scores of the cycle that answered,
and one picture with each label's heatmap from the served model (top row) and cycle 0 (bottom row).

    python examples/explain_a_film.py                        # in a project after `make run`: a shipped phantom film
    python examples/explain_a_film.py film.dcm --project path/to/project --out film-heatmaps.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline import explain, load_cycle
from pipeline.viewer.examples import HERE as EXAMPLE_FILMS
from pipeline.viewer.render import overlay, png_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("film", nargs="?", default=str(EXAMPLE_FILMS / "phantom_cardiomegaly.png"),
                        help="a PNG, JPEG or DICOM film (default: a phantom film shipped with the viewer)")
    parser.add_argument("--project", default=".", help="the trained project (default: here)")
    parser.add_argument("--out", default="explained.png", help="where the heatmap picture goes")
    args = parser.parse_args()

    e = explain(args.film, root=args.project)
    scores = load_cycle(args.project, e.cycle).scores
    print(f"{Path(args.film).name}: cycle {e.cycle} (test AUROC {scores['auroc_macro']:.3f}, "
          f"heatmap in anatomy {scores['cam_in_anatomy']:.3f})")
    for label, p in sorted(e.probabilities.items(), key=lambda item: -item[1]):
        share = e.anatomy_shares[label]
        call = "finding" if label in e.findings else "-"
        print(f"  {label:<18} {p:.3f}  threshold {e.thresholds[label]:.3f}  {call:<7}  "
              f"heatmap in its anatomy {'n/a' if share is None else f'{share:.2f}'}")

    rows = [e] + ([e.baseline] if e.baseline is not None else [])
    picture = np.concatenate([np.concatenate([overlay(r.image, r.heatmaps[label], size=160) for label in r.heatmaps],
                                             axis=1) for r in rows], axis=0)
    Path(args.out).write_bytes(png_bytes(picture))
    print(f"heatmaps ({', '.join(e.heatmaps)}; rows: cycle {', cycle '.join(str(r.cycle) for r in rows)}): {args.out}")


if __name__ == "__main__":
    main()
