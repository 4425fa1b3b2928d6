"""Metric functions against hand-computed values and toy models with a known answer."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.metrics.classification import choose_thresholds, classification_metrics, roc_curve_points
from pipeline.metrics.faithfulness import road_score
from pipeline.metrics.localization import boxes_to_mask, cam_iou, energy_share, pointing_game_hit
from pipeline.metrics.sanity import cascading_randomization, rank_correlation

NAN = float("nan")


# --------------------------------------------------------------------------- classification

def _toy():
    # label A: row 4 is unknown (NaN) and carries a score that would change every figure if used
    # label B: negatives only
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [NAN, 0], [1, 0]], dtype=float)
    s = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.2], [0.1, 0.3], [0.99, 0.4], [0.8, 0.2]])
    return y, s


def test_classification_by_hand():
    y, s = _toy()
    m = classification_metrics(y, s, np.array([0.5, 0.5]), ["A", "B"])
    a, b = m["per_label"]["A"], m["per_label"]["B"]
    # A on known rows: positives {0.9, 0.35, 0.8}, negatives {0.4, 0.1}
    # AUROC = correctly ordered pos/neg pairs: all but (0.35, 0.4) -> 5/6
    assert a["auroc"] == pytest.approx(5 / 6)
    # at 0.5: tp = 2 (0.9, 0.8), fn = 1 (0.35), fp = 0, tn = 2
    assert a["confusion"] == [[2, 0], [1, 2]]
    assert (a["n"], a["n_pos"], a["threshold"]) == (5, 3, 0.5)
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(1.0)
    assert a["precision"] == pytest.approx(1.0)
    assert a["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    assert a["accuracy"] == pytest.approx(4 / 5)
    # B: one class -> AUROC and sensitivity undefined; one false positive (0.6) among 6 negatives
    assert b["auroc"] is None and b["sensitivity"] is None
    assert b["confusion"] == [[5, 1], [0, 0]]
    assert b["specificity"] == pytest.approx(5 / 6)
    assert b["precision"] == 0.0 and b["f1"] == 0.0
    # macro means over labels where defined
    assert m["auroc_macro"] == pytest.approx(5 / 6)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx((1 + 5 / 6) / 2)
    assert m["f1"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx((4 / 5 + 5 / 6) / 2)
    json.dumps(m, allow_nan=False)  # plain, NaN-free values
    assert all(type(v) in (float, int, list) or v is None for v in a.values())


def test_prediction_is_score_at_or_above_threshold():
    y, s = _toy()
    a = classification_metrics(y, s, [0.35, 0.5], ["A", "B"])["per_label"]["A"]
    assert a["confusion"] == [[1, 1], [0, 3]]  # 0.35 counts as positive


def test_undefined_figures_are_none_not_nan():
    y = np.array([[NAN], [NAN]])
    m = classification_metrics(y, np.array([[0.2], [0.7]]), [0.5], ["A"])
    assert m["per_label"]["A"]["n"] == 0
    assert all(m[k] is None for k in ("auroc_macro", "f1", "accuracy", "sensitivity", "specificity"))
    json.dumps(m, allow_nan=False)


def test_youden_thresholds():
    # negatives {.1, .2, .6, .65}, positives {.5, .7, .8, .9}
    # J at .7 = 3/4 - 0 = .75 (best); at .5 = 1 - 2/4 = .5
    y = np.array([[0, 0, NAN], [0, 0, NAN], [0, 0, NAN], [0, 0, NAN],
                  [1, 0, NAN], [1, 0, NAN], [1, 0, NAN], [1, 0, NAN]], dtype=float)
    a = np.array([0.1, 0.2, 0.6, 0.65, 0.5, 0.7, 0.8, 0.9])
    s = np.stack([a, a, a], axis=1)
    np.testing.assert_allclose(choose_thresholds(y, s), [0.7, 0.5, 0.5])
    # perfectly separable: the lowest positive score
    y2 = np.array([[0], [0], [1], [1]], dtype=float)
    np.testing.assert_allclose(choose_thresholds(y2, np.array([[0.1], [0.3], [0.4], [0.9]])), [0.4])


def test_roc_points():
    pts = roc_curve_points(np.array([0, 1, NAN, 1, 0]), np.array([0.1, 0.8, 0.5, 0.6, 0.3]))
    # known rows: positives {.8, .6}, negatives {.1, .3} -> perfect separation
    assert pts == {"fpr": [0.0, 0.0, 0.0, 1.0], "tpr": [0.0, 0.5, 1.0, 1.0]}
    assert roc_curve_points(np.zeros(4), np.linspace(0, 1, 4)) == {"fpr": [], "tpr": []}
    rng = np.random.default_rng(0)
    yb = rng.integers(0, 2, 2000).astype(float)
    big = roc_curve_points(yb, rng.random(2000), max_points=50)
    assert len(big["fpr"]) <= 50 and big["fpr"][0] == 0.0 and big["fpr"][-1] == 1.0


# --------------------------------------------------------------------------- localisation

def test_localisation_on_8x8_maps():
    cam = np.zeros((8, 8))
    cam[1:3, 1:3] = 1.0      # 4 px of mass 1
    cam[6, 6] = 4.0          # the peak
    cam[5, 5] = 2.0
    region = np.zeros((8, 8), bool)
    region[0:4, 0:4] = True
    assert energy_share(cam, region) == pytest.approx(4 / 10)
    assert energy_share(np.zeros((8, 8)), region) is None
    # peak at (6, 6) is outside; Euclidean distance to (3, 3) is sqrt(18) ~ 4.24
    assert not pointing_game_hit(cam, region)
    assert not pointing_game_hit(cam, region, tolerance_px=4)
    assert pointing_game_hit(cam, region, tolerance_px=5)
    assert pointing_game_hit(cam, boxes_to_mask([(6, 6, 1, 1)], (8, 8)))
    # hot = cam >= 2: {(6,6), (5,5)}; target = 2x2 at rows/cols 5..6 -> inter 2, union 4
    target = boxes_to_mask([(5, 5, 2, 2)], (8, 8))
    assert cam_iou(cam, target) == pytest.approx(2 / 4)
    # lower threshold: hot adds the 4 px block (>= 1) -> inter 2, union 4 + 4 = 8
    assert cam_iou(cam, target, threshold=0.25) == pytest.approx(2 / 8)
    assert cam_iou(np.zeros((8, 8)), target) == 0.0


def test_boxes_to_mask_is_xywh_and_clipped():
    m = boxes_to_mask([(1, 2, 3, 1), (6, 6, 5, 5)], (8, 8))
    assert m.sum() == 3 + 4
    assert m[2, 1:4].all() and not m[1, 1] and m[7, 7]


# --------------------------------------------------------------------------- sanity

def test_rank_correlation_extremes():
    a = np.arange(16, dtype=float).reshape(1, 1, 4, 4)
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    both = np.concatenate([a, np.ones_like(a)])  # the constant map pair is skipped
    assert rank_correlation(both, both * np.array([1.0, 3.0]).reshape(2, 1, 1, 1)) == pytest.approx(1.0)
    assert rank_correlation(np.ones((2, 1, 4, 4)), np.ones((2, 1, 4, 4))) == 0.0


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, keep=None):
        a = self.conv2(torch.relu(self.conv1(x)))
        if keep is not None:
            keep.append(a)
        return self.fc(torch.relu(a).mean((2, 3)))


def gradcam(model: TinyCNN, x: torch.Tensor) -> torch.Tensor:
    """Plain Grad-CAM on conv2, every label: relu(sum_k mean(dy/dA_k) * A_k)."""
    acts = []
    out = model(x, keep=acts)
    cams = []
    for label in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, label].sum(), acts[0], retain_graph=True)
        cams.append(torch.relu((grad.mean((2, 3), keepdim=True) * acts[0]).sum(1)))
    return torch.stack(cams, 1).detach()


def test_cascading_randomization_destroys_cams_and_leaves_model_alone():
    torch.manual_seed(0)
    model = TinyCNN().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 1, 12, 12)
    assert rank_correlation(gradcam(model, x), gradcam(copy.deepcopy(model), x)) == pytest.approx(1.0)
    rng_before = torch.get_rng_state()
    r = cascading_randomization(model, x, gradcam, seed=3)
    assert torch.equal(rng_before, torch.get_rng_state())  # global RNG untouched
    assert [s["randomized_upto"] for s in r["steps"]] == ["fc", "conv2", "conv1"]
    assert r["final_rank_corr"] == r["steps"][-1]["rank_corr"]
    assert r["final_rank_corr"] < 0.5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training
    assert cascading_randomization(model, x, gradcam, seed=3) == r


def test_cascading_randomization_groups_into_at_most_12_steps():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(30)])

    def cam_fn(m, x):
        return (m(x) ** 2).reshape(len(x), 1, 2, 2).detach()

    r = cascading_randomization(model, torch.randn(3, 4), cam_fn)
    assert len(r["steps"]) == 12 and r["steps"][-1]["randomized_upto"] == "0"


# --------------------------------------------------------------------------- faithfulness

class RegionModel(nn.Module):
    """Label 0 is noise-free: its logit is a scaled mean of one fixed image region."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region).float())

    def forward(self, x):
        m = (x[:, 0] * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([6 * m - 3, x.mean((1, 2, 3))], 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_road_prefers_the_informative_pixels(channels):
    size = 16
    region = np.zeros((size, size), np.float32)
    region[2:7, 2:7] = 1
    x = 0.05 * torch.rand(3, channels, size, size)
    x[:, :, 2:7, 2:7] += 1.0  # the region is bright, so imputing it from the dark surround drops the logit
    model = RegionModel(region)
    rng = np.random.default_rng(0)
    good = np.stack([region + 0.01 * rng.random(region.shape) for _ in range(3)])
    elsewhere = np.zeros_like(region)
    elsewhere[9:14, 9:14] = 1
    bad = np.stack([elsewhere + 0.01 * rng.random(region.shape) for _ in range(3)])
    s_good, s_bad = road_score(model, x, good, 0), road_score(model, x, bad, 0)
    assert math.isfinite(s_good) and math.isfinite(s_bad)
    assert s_good > s_bad + 0.1
    assert road_score(model, x, good, 0) == s_good  # seeded imputation noise
