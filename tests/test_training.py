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


def test_batches_are_the_same_for_any_number_of_workers(tmp_path):
    """Decode and augmentation move to worker processes; what each step sees must not change."""
    from pipeline.data.loader import EpochBatches, batch_loader

    store, y = two_label_store(tmp_path / "imgs", 48)
    batches = EpochBatches(store.root, np.arange(40), y[:40], 16, seed=5, augment=AugmentParams(noise=0.05))
    seen = {}
    for workers in (0, 2):
        loader, sampler = batch_loader(batches, workers)
        seen[workers] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            seen[workers] += [(x.clone(), yy.clone(), torch.as_tensor(i).clone()) for x, yy, i in loader]
    assert len(seen[0]) == 6  # 3 batches (16, 16, 8) per epoch
    for (x0, y0, i0), (x2, y2, i2) in zip(seen[0], seen[2], strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0.nan_to_num(-1), y2.nan_to_num(-1)) and (i0 == i2).all()
    assert not (seen[0][0][2] == seen[0][3][2]).all()  # each epoch has its own order
    # a loader started at batch 2 (a resumed run) yields exactly the tail of the full epoch
    loader, sampler = batch_loader(batches, 2)
    sampler.set_epoch(1, start=2)
    (x_tail, _, i_tail), = list(loader)
    assert torch.equal(x_tail, seen[0][5][0]) and (i_tail == seen[0][5][2]).all()


def test_workers_start_clean_in_a_process_that_ran_a_prefect_flow(tmp_path, prefect_harness):
    """Workers forked from a process that had run a flow inherited Prefect 3.8's at-exit drain, which
    fails in a fork after Prefect's own reset: every worker exited with code 1 at shutdown and the
    DataLoader raised (a flaky `make test`, the flow's worker being shared). They come from a fork
    server now (pipeline.data.loader.worker_context)."""
    from prefect import flow

    from pipeline.data.loader import EpochBatches, batch_loader, stop_workers

    @flow
    def one():
        return 1

    assert one() == 1
    store, y = two_label_store(tmp_path / "imgs", 16)
    loader, sampler = batch_loader(EpochBatches(store.root, np.arange(16), y, 8, seed=0), 2)
    assert [len(i) for _, _, i in loader] == [8, 8]
    assert stop_workers(loader) == [0, 0]


def _toy_run(tmp_path, resume_dir, **options):
    store, y = two_label_store(tmp_path / "imgs", 48)
    torch.manual_seed(0)
    model = create_model("tinyvgg", 2)
    spec = TrainSpec(epochs=2, lr=3e-3, weight_decay=0.0, batch_size=8, seed=0, augment=AugmentParams())
    idx = np.arange(len(store))
    res = train_classifier(model, spec, ["a", "b"], Rows(store, idx[:36], y[:36]), Rows(store, idx[36:], y[36:]),
                           resume_dir, **options)
    return model, res


def test_worker_processes_change_nothing_but_speed(tmp_path):
    a, res_a = _toy_run(tmp_path, tmp_path / "w0", num_workers=0)
    b, res_b = _toy_run(tmp_path, tmp_path / "w2", num_workers=2)
    assert res_a["history"] == res_b["history"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_killed_mid_epoch_it_resumes_from_the_step_and_ends_byte_equal(tmp_path, monkeypatch):
    from pipeline.models.checkpoint import load_tensors

    full, res = _toy_run(tmp_path, tmp_path / "full", checkpoint_every=2)
    real_bce = training.masked_bce

    def killed_at(step: int):
        """masked_bce that raises on its `step`-th call: a kill before that optimiser step."""
        calls = {"n": 0}

        def bce(*a, **k):
            calls["n"] += 1
            if calls["n"] == step:
                raise KeyboardInterrupt("simulated kill")
            return real_bce(*a, **k)
        return bce

    # 36 rows in batches of 8: 5 steps per epoch, resume points after steps 2 and 4 and at each epoch's end
    monkeypatch.setattr(training, "masked_bce", killed_at(7))
    with pytest.raises(KeyboardInterrupt):  # at step 2 of epoch 2, before its resume point
        _toy_run(tmp_path, tmp_path / "r", checkpoint_every=2)
    meta = load_tensors(tmp_path / "r" / RESUME_FILE)[1]
    assert (meta["epoch"], meta["step"]) == (0, 0)  # epoch 1 complete
    monkeypatch.setattr(training, "masked_bce", killed_at(4))
    with pytest.raises(KeyboardInterrupt):  # resumed at epoch 2, killed again at its step 4
        _toy_run(tmp_path, tmp_path / "r", checkpoint_every=2)
    meta = load_tensors(tmp_path / "r" / RESUME_FILE)[1]
    assert (meta["epoch"], meta["step"]) == (0, 2)  # the mid-epoch point after step 2 of epoch 2
    monkeypatch.setattr(training, "masked_bce", real_bce)
    resumed, res2 = _toy_run(tmp_path, tmp_path / "r", checkpoint_every=2)
    assert [list(h.items()) for h in res2["history"]] == [list(h.items()) for h in res["history"]]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_bf16_autocast_trains_on_the_cpu_close_to_fp32(tmp_path):
    from pipeline.compute import Compute

    _, fp32 = _toy_run(tmp_path, tmp_path / "a")
    _, bf16 = _toy_run(tmp_path, tmp_path / "b", compute=Compute(torch.device("cpu"), "bf16"))
    assert bf16["history"] != fp32["history"]  # the path really ran in bfloat16
    assert abs(bf16["best_score"] - fp32["best_score"]) < 0.1
    assert abs(bf16["history"][-1]["train_loss"] - fp32["history"][-1]["train_loss"]) < 0.1
