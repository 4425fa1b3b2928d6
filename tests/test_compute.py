"""`compute.device` and `compute.precision` outside classifier training (tests/test_training.py has that).

This machine has no GPU, so the device half is tested by what must hold on the CPU: a CUDA device is
refused at params load, `auto` is the CPU, and the viewer starts either way. The precision half runs
for real: bf16 autocast works on the CPU.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml

from pipeline.cam.all_labels import AllLabelCAM
from pipeline.compute import CPU, Compute, resolve_device
from pipeline.config import ComputeParams, ConfigError, SegmentParams, load_params
from pipeline.data import phantom
from pipeline.data.dataset import iterate_batches, predict
from pipeline.data.record import encode_anatomy
from pipeline.data.store import ArrayStore, ArrayStoreWriter
from pipeline.metrics.faithfulness import road_score
from pipeline.models.checkpoint import save_model
from pipeline.models.registry import create_model
from tests.conftest import ROOT

log = logging.getLogger(__name__)

BF16 = Compute(torch.device("cpu"), "bf16")
SIZE, LABELS, N = 64, 3, 24
# bf16 keeps 8 bits of mantissa: a logit moves by up to ~1% of its size, a probability by at most a
# quarter of the logit's error (the sigmoid's slope). On the small trained model here the largest
# difference is ~0.003; a net overfitted to logits of +-10 can move a probability by a few hundredths.
PROB_TOLERANCE = 0.02
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@pytest.fixture(scope="module")
def films():
    """N phantom films (uint8, SIZE px), their lungs/heart bit masks and findings (float 0/1)."""
    rng = np.random.default_rng(3)
    images, masks, findings = [], [], []
    for _ in range(N):
        found = {lab: bool(rng.random() < 0.5) for lab in phantom.PHANTOM_LABELS}
        film = phantom.render(rng, SIZE, phantom.sample_patient(rng), found, {})
        images.append(film.image)
        masks.append(encode_anatomy(film.lungs, film.heart))
        findings.append([float(found[lab]) for lab in phantom.PHANTOM_LABELS])
    return np.stack(images), np.stack(masks), np.asarray(findings, np.float32)


@pytest.fixture(scope="module")
def store(films, tmp_path_factory):
    root = tmp_path_factory.mktemp("compute") / "images"
    with ArrayStoreWriter(root, (SIZE, SIZE), np.uint8, 16) as writer:
        writer.append(films[0])
    return ArrayStore(root)


def _classifier(arch: str = "tinyvgg") -> torch.nn.Module:
    """A random classifier whose last layer's init is not zero (ViT-style heads start at zero)."""
    torch.manual_seed(0)
    model = create_model(arch, LABELS, image_size=SIZE).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(last.weight, std=0.05)
    return model


def _trained(films, store, steps: int = 25) -> torch.nn.Module:
    """tinyvgg fitted (full batch, Adam) to the films' first LABELS findings: a random net's
    probabilities all sit near 0.5, where no precision error shows; these spread over (0, 1)."""
    model = _classifier()
    x = next(iterate_batches(store, np.arange(len(store)), None, len(store)))[0]
    y = torch.from_numpy(films[2][:, :LABELS])
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# -- params -------------------------------------------------------------------------------------


def _params_file(tmp_path, compute: dict):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["compute"] = {**raw.get("compute", {}), **compute}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_is_refused_at_params_load_without_a_gpu(tmp_path, device):
    with pytest.raises(ConfigError, match=r"compute\.device.*no CUDA device"):
        load_params(_params_file(tmp_path, {"device": device}))


def test_bad_device_and_fp16_on_the_cpu_are_refused_at_params_load(tmp_path):
    with pytest.raises(ConfigError, match=r"compute\.device.*not a device"):
        load_params(_params_file(tmp_path, {"device": "gpu0"}))
    with pytest.raises(ConfigError, match=r"fp16 needs a GPU"):
        load_params(_params_file(tmp_path, {"device": "cpu", "precision": "fp16"}))


@no_gpu
def test_auto_is_the_cpu_here(tmp_path):
    params = load_params(_params_file(tmp_path, {"device": "auto", "precision": "bf16"}))
    assert Compute.from_params(params.compute) == BF16
    assert resolve_device("auto") == CPU.device


@no_gpu
@pytest.mark.parametrize("compute, expect", [({"device": "auto", "precision": "bf16"}, BF16),
                                             ({"device": "cuda", "precision": "bf16"}, BF16),
                                             ({"device": "cuda", "precision": "fp16"}, CPU)])
def test_the_viewer_starts_on_a_machine_without_the_params_gpu(tmp_path, compute, expect):
    """auto is the CPU here; a params.yaml written for a GPU machine does not validate here, and the
    viewer keeps its precision where the CPU can run it (fp16 cannot)."""
    from pipeline.viewer.inference import ServedModels

    _params_file(tmp_path, compute)
    assert ServedModels(tmp_path).compute == expect


# -- classifier predictions and CAMs ------------------------------------------------------------


def test_bf16_predictions_match_fp32(films, store):
    model = _trained(films, store)
    idx = np.arange(N)
    fp32 = predict(model, store, idx, 8)
    bf16 = predict(model, store, idx, 8, compute=BF16)
    assert fp32.dtype == bf16.dtype == np.float32 and bf16.shape == (N, LABELS)
    assert np.ptp(fp32) > 0.5                   # probabilities spread out, not all near 0.5
    diff = np.abs(bf16 - fp32)
    log.info("bf16 vs fp32 probabilities: max abs difference %.4f, mean %.5f over %d", diff.max(), diff.mean(),
             diff.size)
    assert diff.max() > 0                      # autocast ran: not the fp32 bytes
    assert diff.max() < PROB_TOLERANCE and diff.mean() < PROB_TOLERANCE / 10
    assert np.array_equal(fp32, predict(model, store, idx, 8, compute=CPU))  # fp32: the default path


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_cams_are_fp32_inside_autocast(store, method):
    """CAMs are computed in fp32 whatever the precision: inside a bf16 autocast block they are the
    fp32 maps bit for bit. Without the guard they are not (so the test can fail)."""
    import contextlib

    import pipeline.cam.all_labels as all_labels

    model, arch = _classifier(), "tinyvgg"
    x = next(iterate_batches(store, np.arange(4), None, 4))[0]
    fp32 = AllLabelCAM(model, arch, method)(x)
    with BF16.autocast():
        under_bf16 = AllLabelCAM(model, arch, method)(x)
    assert under_bf16.dtype == torch.float32
    assert torch.equal(under_bf16, fp32)

    with pytest.MonkeyPatch.context() as mp:  # what the guard prevents
        mp.setattr(all_labels, "full_precision", lambda device: contextlib.nullcontext())
        with BF16.autocast():
            unguarded = AllLabelCAM(model, arch, method)(x)
    assert not torch.equal(unguarded, fp32)


def test_road_is_fp32_inside_autocast(store):
    model = _classifier()
    x = next(iterate_batches(store, np.arange(4), None, 4))[0]
    cams = np.random.default_rng(0).random((4, SIZE, SIZE)).astype(np.float32)
    fp32 = road_score(model, x, cams, 0)
    with BF16.autocast():
        assert road_score(model, x, cams, 0) == fp32


def test_cam_shards_ignore_the_precision(store, tmp_path):
    """The cam stage's tasks get the compute section; their maps are the fp32 maps on every precision."""
    from pipeline.cam.store import cam_shard

    model = _classifier()
    save_model(tmp_path / "m", model, {"arch": "tinyvgg", "labels": ["a", "b", "c"], "image_size": SIZE})
    rows = np.arange(6)
    args = (str(tmp_path / "m"), str(store.root), rows, "gradcam", None, 4)
    plain = cam_shard(*args)
    assert plain.dtype == np.float16 and plain.shape[:2] == (6, LABELS)
    assert np.array_equal(cam_shard(*args, ComputeParams(device="cpu", precision="bf16")), plain)
    assert np.array_equal(cam_shard(*args, ComputeParams(device="auto")), plain)


# -- the anatomy U-Net --------------------------------------------------------------------------


def _segment_params() -> SegmentParams:
    return SegmentParams(size=32, epochs=1, batch_size=8, n_train=16, augment=False)  # 2 steps


def test_unet_trains_and_predicts_in_bf16_on_the_cpu(films, store, tmp_path):
    from pipeline.engine import in_process
    from pipeline.segmentation import (build_unet, predict_masks, predict_store, probabilities, save_unet,
                                       train_unet)

    p = _segment_params()
    images, masks = films[0][:16], films[1][:16]
    known = np.ones((16, 2), bool)
    torch.manual_seed(p.seed)
    start = {k: v.clone() for k, v in build_unet(p.encoder).state_dict().items()}

    bf16_net = train_unet(p, images, masks, known, BF16)
    fp32_net = train_unet(p, images, masks, known)
    weights = bf16_net.state_dict()
    assert all(v.dtype == start[k].dtype and torch.isfinite(v.float()).all() for k, v in weights.items())
    assert any(not torch.equal(weights[k], start[k]) for k in start)               # it trained
    assert any(not torch.equal(weights[k], v) for k, v in fp32_net.state_dict().items())  # in bf16

    probs = probabilities(bf16_net, films[0], p.size, SIZE, BF16)
    assert probs.dtype == torch.float32 and probs.device.type == "cpu" and probs.shape == (N, 2, SIZE, SIZE)
    assert 0 <= float(probs.min()) and float(probs.max()) <= 1
    diff = float((probs - probabilities(bf16_net, films[0], p.size, SIZE)).abs().max())
    log.info("U-Net bf16 vs fp32 inference: max abs probability difference %.4f", diff)
    assert diff < 0.05
    pred = predict_masks(bf16_net, films[0], p.size, SIZE, BF16)
    assert pred.dtype == np.uint8 and pred.shape == (N, SIZE, SIZE)

    # the segment stage's shard tasks: the compute section travels with them and is resolved there
    save_unet(tmp_path / "unet.safetensors", bf16_net, p)
    plain, _ = predict_store(in_process(), tmp_path / "unet.safetensors", store, tmp_path / "fp32", 16)
    cpu, _ = predict_store(in_process(), tmp_path / "unet.safetensors", store, tmp_path / "cpu", 16,
                           ComputeParams(device="cpu"))
    bf16, _ = predict_store(in_process(), tmp_path / "unet.safetensors", store, tmp_path / "bf16", 16,
                            ComputeParams(device="cpu", precision="bf16"))
    assert np.array_equal(cpu.read(np.arange(N)), plain.read(np.arange(N)))       # cpu/fp32: the same bytes
    agree = float((bf16.read(np.arange(N)) == plain.read(np.arange(N))).mean())
    log.info("U-Net masks: bf16 and fp32 agree on %.4f of the pixels", agree)
    assert agree > 0.98


def test_unet_fp16_takes_the_grad_scaler_path(films, monkeypatch):
    """fp16 is refused on the CPU at params load (so is never configured here), but the GradScaler
    branch of the U-Net's training loop runs on the CPU when asked for directly."""
    import pipeline.segmentation as segmentation

    scalers = []
    real = segmentation.grad_scaler

    def spy(device, precision):
        scalers.append(real(device, precision))
        return scalers[-1]

    monkeypatch.setattr(segmentation, "grad_scaler", spy)
    p = SegmentParams(size=32, epochs=1, batch_size=4, n_train=4, augment=False)  # one step: fp16 is slow here
    net = segmentation.train_unet(p, films[0][:4], films[1][:4], np.ones((4, 2), bool),
                                  Compute(torch.device("cpu"), "fp16"))
    assert isinstance(scalers[0], torch.amp.GradScaler)
    assert all(torch.isfinite(v.float()).all() for v in net.state_dict().values())
