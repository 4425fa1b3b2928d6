"""The viewer's shortcut warning: does a label's heatmap prefer the anatomy where its finding lives?

The share of heatmap energy inside the anatomy means little alone: the lungs cover about a third of
a phantom film and the heart a tenth, so a fixed cut-off (it was 0.5) warns on almost every heatmap
of the heart and on most of the lungs', however good the model. The rule compares the share with
what a heatmap spread evenly over the film would put there:

    lift = (heatmap energy inside the anatomy / all heatmap energy) / (anatomy pixels / all pixels)

Lift 1 means no preference for the anatomy; the warning fires when the lift is below
`SHORTCUT_LIFT` (1.0): the heatmap puts *less* of its energy on the anatomy than an even spread would,
so most of what drives the score lies elsewhere (a marker, text, the film's edge). No calibration
on a run's films: the cut-off means the same thing on every dataset and every anatomy size.
`python -m pipeline.viewer.warning_check --root .` measures how often it fires on a run's test films.
"""
from __future__ import annotations

import numpy as np

from pipeline.metrics.localization import energy_share

SHORTCUT_LIFT = 1.0
RULE = (f"warn when heatmap energy inside the label's anatomy, divided by the anatomy's share of the image "
        f"(the lift; 1 = no preference), is below {SHORTCUT_LIFT:g}")


def anatomy_fraction(region: np.ndarray) -> float | None:
    """The share of the image's pixels in `region`; None for an empty region (no anatomy found)."""
    fraction = float(np.asarray(region, bool).mean())
    return fraction if fraction > 0 else None


def lift(share: float | None, fraction: float | None) -> float | None:
    """Energy share over area share; None when either is missing (empty heatmap, no anatomy)."""
    if share is None or fraction is None:
        return None
    return share / fraction


def heatmap_lift(cam: np.ndarray, region: np.ndarray) -> float | None:
    return lift(energy_share(cam, region), anatomy_fraction(region))


def warns(value: float | None) -> bool | None:
    """Whether a lift warns (None when there is no lift to judge)."""
    return None if value is None else bool(value < SHORTCUT_LIFT)


def rule_summary() -> dict:
    """The rule as the model card and GET /api/v1/model give it."""
    return {"rule": RULE, "lift_below": SHORTCUT_LIFT}
