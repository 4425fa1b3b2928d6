import numpy as np
import pytest
import torch

import pipeline.training as training
from pipeline.config import AugmentParams
from pipeline.models.registry import create_model
from pipeline.training import RESUME_FILE, Rows, TrainSpec, masked_bce, train_classifier
from tests.fixtures.toy import train_toy, two_label_store


def test_masked_bce_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(0.5))) / 2  # hand-computed BCE of the two known
    assert float(masked_bce(logits, targets)) == pytest.approx(expected, rel=1e-6)
    assert float(masked_bce(logits, torch.full((2, 2), float("nan")))) == 0.0


def _run(tmp_path, store, y, resume_dir):
    return train_toy(store, y, resume_dir, epochs=3, batch_size=16, n_train=36)


def test_learns_and_resumes_to_identical_weights(tmp_path, monkeypatch):
    store, y = two_label_store(tmp_path / "imgs", 48)
    full, res = _run(tmp_path, store, y, tmp_path / "r1")
    assert len(res["history"]) == 3 and len(res["thresholds"]) == 2
    assert res["best_score"] > 0.8  # separable toy task: val AUROC

    real_predict, calls = training.predict, {"n": 0}

    def killed_after_first_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_predict(*a, **k)

    monkeypatch.setattr(training, "predict", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, store, y, tmp_path / "r2")
    assert (tmp_path / "r2" / RESUME_FILE).is_file()
    monkeypatch.setattr(training, "predict", real_predict)
    resumed, res2 = _run(tmp_path, store, y, tmp_path / "r2")
    assert [h["epoch"] for h in res2["history"]] == [0, 1, 2]
    # the resume file's metadata is JSON with sorted keys: the resumed history still comes back as an
    # uninterrupted run's, values and key order alike (history.csv's bytes; found by a SIGKILL test)
    assert [list(h.items()) for h in res2["history"]] == [list(h.items()) for h in res["history"]]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_selects_on_one_split_and_calibrates_thresholds_on_another(tmp_path):
    from pipeline.data.dataset import predict
    from pipeline.metrics.classification import choose_thresholds

    store, y = two_label_store(tmp_path / "imgs", 48)
    idx = np.arange(len(store))
    torch.manual_seed(0)
    model = create_model("tinyvgg", 2)
    spec = TrainSpec(epochs=2, lr=3e-3, weight_decay=0.0, batch_size=16, seed=0, augment=AugmentParams())
    calibrate = Rows(store, idx[:36], y[:36])
    res = train_classifier(model, spec, ["a", "b"], Rows(store, idx[:36], y[:36]), Rows(store, idx[36:], y[36:]),
                           tmp_path / "r", calibrate=calibrate)
    expected = choose_thresholds(y[:36], predict(model, store, idx[:36], 32))
    np.testing.assert_allclose(res["thresholds"], expected)


def test_same_seed_same_weights_whatever_ran_before(tmp_path):
    """Dropout's randomness comes from the spec's seed, not from the global generator's state."""
    store, y = two_label_store(tmp_path / "imgs", 48)
    idx = np.arange(len(store))
    spec = TrainSpec(epochs=2, lr=3e-3, weight_decay=0.0, batch_size=16, seed=3, augment=AugmentParams())
    weights = []
    for noise in (0, 1000):
        torch.manual_seed(0)
        model = create_model("tinyvgg", 2)
        torch.rand(noise)  # whatever the process did before training
        before = torch.get_rng_state()
        train_classifier(model, spec, ["a", "b"], Rows(store, idx[:36], y[:36]), Rows(store, idx[36:], y[36:]),
                         tmp_path / f"r{noise}")
        assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left alone
        weights.append(model.state_dict())
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=0, atol=0, msg=k)
