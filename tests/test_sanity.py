"""Saliency sanity checks (Adebayo et al.): the label-permutation metric on a tiny model, its verdicts in
reports/sanity.json's shape, the report's and the model card's flags, and the params that drive it."""
from __future__ import annotations

import html
import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.cam.all_labels import AllLabelCAM
from pipeline.config import ConfigError, load_params
from pipeline.metrics.sanity import SANITY_MAX, label_permutation, permute_labels
from pipeline.models.registry import create_model
from pipeline.report import _html_sanity
from pipeline.scores import sanity_line, sanity_lines
from pipeline.viewer.card import card_markdown, label_permutation_entry, model_card
from tests.conftest import tiny_params
from tests.reliability import record

SIZE, WIDTHS = 64, (8, 8, 16, 16)  # TinyVGG's 8x8 Grad-CAM grid at 64 px


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Noise images; label k is positive when a bright square sits in half k (left / right)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 2)) < 0.5).astype(np.float32)
    x = rng.normal(0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    for i, k in zip(*np.nonzero(y)):
        r, c = rng.integers(2, SIZE - 8), rng.integers(2 + k * SIZE // 2, (k + 1) * SIZE // 2 - 6)
        x[i, 0, r:r + 8, c:c + 8] += 2.0
    return torch.from_numpy(np.repeat(x, 3, axis=1)), y


def _train(x: torch.Tensor, y: np.ndarray, steps: int = 150) -> torch.nn.Module:
    """The same init (seed 0) and schedule whatever the labels: only the labels differ between twins."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model("tinyvgg", 2, widths=WIDTHS)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        gen, targets = torch.Generator().manual_seed(0), torch.from_numpy(y)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (32,), generator=gen)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _cam_fn(model, batch):
    return AllLabelCAM(model, "tinyvgg", "gradcam")(batch)


@pytest.fixture(scope="module")
def blobs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and fair to a shared machine
    try:
        x, y = _blobs(256, 0)
        x_test, y_test = _blobs(16, 1)
        yield x, y, x_test, y_test, _train(x, y)
    finally:
        torch.set_num_threads(threads)


def _auroc(model, x, y) -> float:
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        p = torch.sigmoid(model(x)).numpy()
    return float(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(y.shape[1])]))


def _check(blobs, seed: int) -> dict:
    x, y, x_test, y_test, real = blobs
    seen = []

    def train_twin(permuted):
        seen.append(permuted)
        twin = _train(x, permuted["train"])
        return twin, {"test_auroc": _auroc(twin, x_test, y_test)}

    res = label_permutation({"real": real}, x_test, _cam_fn, train_twin, {"train": y}, seed=seed)
    assert len(seen) == 1 and not np.array_equal(seen[0]["train"], y)
    return res


def test_permuted_label_twin_gives_low_correlation(blobs):
    x, y, x_test, y_test, real = blobs
    assert _auroc(real, x_test, y_test) > 0.95  # the real model learned where the squares are
    before = {k: v.clone() for k, v in real.state_dict().items()}
    res = _check(blobs, seed=0)
    assert res["rank_corr"]["real"] < SANITY_MAX and res["passed"] == {"real": True}
    assert res["n_maps"]["real"] >= 16 and res["seed"] == 0 and res["max"] == SANITY_MAX
    assert abs(res["twin"]["test_auroc"] - 0.5) < 0.25  # the permutation destroyed the signal
    assert all(torch.equal(before[k], v) for k, v in real.state_dict().items()) and not real.training
    record("saliency_sanity.unit", label_permutation_rank_corr=res["rank_corr"]["real"],
           twin_auroc=res["twin"]["test_auroc"], cases=1)


def test_a_twin_that_is_the_model_itself_is_flagged(blobs):
    """A 'twin' that learned exactly what the model learned (here: the model) correlates ~1: the check fails."""
    x, y, x_test, _, real = blobs
    res = label_permutation({"real": real}, x_test, _cam_fn, lambda permuted: (real, {}), {"train": y})
    assert res["rank_corr"]["real"] == pytest.approx(1.0, abs=1e-6)
    assert res["passed"] == {"real": False}


def test_a_twin_with_blank_heatmaps_proves_nothing(blobs):
    x, y, x_test, _, real = blobs

    class Flat(torch.nn.Module):
        def forward(self, batch):
            return torch.zeros(len(batch), 2)

    res = label_permutation({"real": real}, x_test, lambda m, b: torch.zeros(len(b), 2, 8, 8) if isinstance(m, Flat)
                            else _cam_fn(m, b), lambda permuted: (Flat(), {}), {"train": y})
    assert res["rank_corr"]["real"] is None and res["n_maps"]["real"] == 0 and res["passed"] == {"real": False}


@pytest.mark.slow
def test_permuted_label_twins_over_seeds(blobs):
    """Long variant: five permutations, every one below the threshold."""
    rhos = [_check(blobs, seed)["rank_corr"]["real"] for seed in range(5)]
    assert max(rhos) < SANITY_MAX, rhos
    record("saliency_sanity.unit_seeds", cases=len(rhos), max_rank_corr=max(rhos), mean_rank_corr=float(np.mean(rhos)))


def test_permute_labels_moves_whole_rows():
    y = np.array([[1, 0, np.nan], [0, 0, 1], [1, 1, 0], [0, 1, np.nan], [0, 0, 0]] * 20, dtype=np.float32)
    val = y[:7].copy()
    a, b = permute_labels({"train": y, "val": val}, 3), permute_labels({"val": val, "train": y}, 3)
    for key in ("train", "val"):
        np.testing.assert_array_equal(a[key], b[key])  # the same permutation whatever the key order
    rows = lambda m: sorted(map(tuple, np.nan_to_num(m, nan=-1).tolist()))  # noqa: E731
    assert rows(a["train"]) == rows(y) and rows(a["val"]) == rows(val)  # prevalence, co-occurrence, NaNs kept
    assert not np.array_equal(np.nan_to_num(a["train"], nan=-1), np.nan_to_num(y, nan=-1))
    assert not np.array_equal(np.nan_to_num(permute_labels({"train": y}, 4)["train"], nan=-1),
                              np.nan_to_num(a["train"], nan=-1))


def test_sanity_params_are_validated(tmp_path):
    p = tiny_params()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    s = load_params(params).sanity
    assert s.label_permutation and s.epochs is None and s.n_images is None and s.seed == 0
    for key, bad in (("epochs", 0), ("n_images", 0), ("label_permutation", "maybe"), ("typo", 1)):
        p2 = {**p, "sanity": {**p["sanity"], key: bad}}
        params.write_text(yaml.safe_dump(p2))
        with pytest.raises(ConfigError, match=f"sanity.{key}"):
            load_params(params)


def _sanity_json(rho_perm: float | None, rho_casc: float = 0.01, cycle: int = 1) -> dict:
    lp_passed = rho_perm is not None and rho_perm < SANITY_MAX
    return {
        "served_cycle": cycle, "max": SANITY_MAX, "cam_method": "gradcam", "n_images": 16,
        "cascading_randomization": {"cycle": cycle, "final_rank_corr": rho_casc, "passed": rho_casc < SANITY_MAX,
                                    "reason": None, "by_cycle": {"c0": 0.0, f"c{cycle}": rho_casc}, "steps": 11},
        "label_permutation": {"cycle": cycle, "rank_corr": rho_perm, "passed": lp_passed,
                              "reason": None if lp_passed else "label permutation: rank correlation too high",
                              "n_maps": 64, "by_cycle": {"c0": 0.05, f"c{cycle}": rho_perm}, "epochs": 10,
                              "seed": 0, "twin_val_auroc": 0.51, "untrained_val_auroc": 0.49, "twin_val_loss": 0.59,
                              "prevalence_val_loss": 0.588},
        "passed": lp_passed and rho_casc < SANITY_MAX,
    }


def _card_root(tmp_path, sanity: dict | None):
    metrics = {"cycle": 1, "auroc_macro": 0.9, "sanity_rank_corr": 0.01}
    (tmp_path / "reports" / "cycles" / "c1").mkdir(parents=True)
    (tmp_path / "reports" / "cycles" / "c1" / "metrics.json").write_text(json.dumps(metrics))
    if sanity is not None:
        (tmp_path / "reports" / "sanity.json").write_text(json.dumps(sanity))
    meta = {"cycle": 1, "arch": "tinyvgg", "labels": ["Pneumonia"], "image_size": 128, "source": "phantom"}
    return model_card(tmp_path, {"stop_reason": "done"}, meta, "ab" * 32, None)


def test_card_flags_a_failing_label_permutation_check(tmp_path):
    card = _card_root(tmp_path, _sanity_json(0.45))
    assert card["label_permutation_flag"] is True and card["sanity_flag"] is False
    assert card["label_permutation"]["rank_corr"] == 0.45 and card["label_permutation"]["passed"] is False
    assert "0.450 >= 0.2" in card["label_permutation"]["reason"]
    md = card_markdown(card)
    assert "⚠ Label-permutation sanity check failed" in md and "0.45" in md
    assert "⚠ Saliency sanity check failed" not in md


def test_card_shows_a_passing_label_permutation_check(tmp_path):
    card = _card_root(tmp_path, _sanity_json(0.03))
    assert card["label_permutation_flag"] is False and card["label_permutation"]["passed"] is True
    md = card_markdown(card)
    assert "⚠" not in md and sanity_line("label_permutation", card["label_permutation"]) in md
    assert "saliency sanity, label permutation (cycle 1): rank corr 0.030 (passes below 0.2): pass" in md


def test_card_without_the_check(tmp_path):
    card = _card_root(tmp_path, None)
    assert card["label_permutation"] is None and card["label_permutation_flag"] is None
    assert "Label-permutation" not in card_markdown(card)


def test_card_flags_blank_twin_heatmaps_and_ignores_other_cycles(tmp_path):
    (tmp_path / "reports").mkdir()
    blank = _sanity_json(None)
    (tmp_path / "reports" / "sanity.json").write_text(json.dumps(blank))
    entry = label_permutation_entry(tmp_path, 1)
    assert entry["passed"] is False and "no informative heatmap pair" in entry["reason"]
    assert label_permutation_entry(tmp_path, 0)["rank_corr"] == 0.05
    assert label_permutation_entry(tmp_path, 3) is None  # checked before cycle 3 existed
    (tmp_path / "reports" / "sanity.json").write_text("{not json")
    assert label_permutation_entry(tmp_path, 1) is None


def test_report_flags_a_failing_check():
    failing = _sanity_json(0.45)
    lines = sanity_lines(failing)
    assert "pass" in lines[0] and "FAIL" in lines[1] and "0.450" in lines[1]
    page = _html_sanity(failing, serve=1)
    assert page.count("FAIL") == 1 and "0.450" in page and "nothing to learn" in page
    assert all(html.escape(line).replace("FAIL", "<b style='color:#b00'>FAIL</b>") in page for line in lines)
    assert "re-run the sanity stage" in _html_sanity(failing, serve=2)
    assert "FAIL" not in _html_sanity(_sanity_json(0.03), serve=1)
    assert "not run" in sanity_lines(None)[0]
