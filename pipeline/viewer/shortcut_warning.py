"""The viewer's shortcut warning: does a label's heatmap prefer the anatomy where its finding lives?

The share of heatmap energy inside the anatomy means little alone: the lungs cover about a third of
a phantom film and the heart a tenth, so a fixed cut-off (it was 0.5) warns on almost every heatmap
of the heart and on most of the lungs', however good the model. The rule compares the share with
what a heatmap spread evenly over the film would put there:

    lift = (heatmap energy inside the anatomy / all heatmap energy) / (anatomy pixels / all pixels)

Lift 1 means no preference for the anatomy. The warning fires when the lift is below `SHORTCUT_LIFT`
(0.5): the anatomy gets less than half the energy an even spread would give it, so what drives the
score lies elsewhere (a marker, text, the film's edge). A fixed cut-off on the lift means the same
on every dataset and anatomy size, and, unlike a cut-off calibrated on a run's own val films, it
still warns on a model that reads markers on every film.

Why 0.5 (`python -m pipeline.viewer.warning_check`, test films of a 900-patient phantom run at the
default settings; the share of positive calls that warn at each cut-off):

| lift below | 0.25 | 0.4 | 0.5 | 0.75 | 1.0 | 1.5 |
|---|---|---|---|---|---|---|
| cycle 0, heatmap peak on a marker (95 calls) | 36 % | 61 % | 78 % | 79 % | 79 % | 81 % |
| refined cycle 3, every positive call (227) | 4 % | 10 % | 15 % | 29 % | 46 % | 63 % |

0.5 is the knee: it warns on 78 % of the marker-reading calls (no cut-off up to 1 reaches more than
79 %) at a third of lift 1's warnings on the refined model (the fixed share of 0.5 warned on 99 % of
them). On the default 1800-patient run (`make run`) the served cycle 3 warns on 6 % of its positive
test calls (33 of 516; the aim is below 10 %) and cycle 0 on 86 % of its positive calls whose
heatmap peak lies on a marker (153 of 178). The misses are Cardiomegaly's: the heart covers a tenth
of the film, so a heatmap that reaches the marker but keeps a fifth of its energy on the heart has a
lift of 2.
"""
from __future__ import annotations

import numpy as np

from pipeline.metrics.localization import energy_share

SHORTCUT_LIFT = 0.5
RULE = (f"warn when the share of heatmap energy inside the label's anatomy, divided by the anatomy's share of "
        f"the image (the lift; 1 = no preference), is below {SHORTCUT_LIFT:g}")


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
